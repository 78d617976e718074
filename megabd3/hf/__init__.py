"""Hugging Face interop: export to / import from the released BD3-LM checkpoint layout."""
