"""Execute one stage (in a worker process, or under SLURM via ``tools/reproduce.py exec``).

Each stage calls the real launchers' ``main(argv)`` (``launchers/pretrain.py``, ``evaluate.py``,
``sample.py``) with its log redirected to ``<stage>/log.txt``, then writes ``<stage>/stage.json``
atomically: ``{"status": "done", "result": {...}}`` or ``{"status": "failed", "reason": "<one line>"}``.
A stage whose ``stage.json`` says done is never run again. An interrupted training stage resumes from
its last checkpoint (the launcher's own auto-resume), so a killed suite loses at most
``checkpoint.save_interval`` steps of the stage that was running.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

from megabd3.errors import UserError
from megabd3.io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
_LAUNCHERS: Dict[str, Any] = {}


def status_of(stage_dir: Path) -> Dict[str, Any]:
    f = stage_dir / "stage.json"
    if not f.is_file():
        return {"status": "pending"}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {"status": "pending"}


def launcher(name: str) -> Callable[[List[str]], Any]:
    """``main`` of launchers/<name>.py (imported once per worker)."""
    if name not in _LAUNCHERS:
        spec = importlib.util.spec_from_file_location(f"megabd3_launcher_{name}", REPO / "launchers" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        _LAUNCHERS[name] = mod.main
    return _LAUNCHERS[name]


def call(name: str, argv: List[str]) -> None:
    """Run a launcher; its one-line ``error:`` (exit 1) becomes a UserError with that line."""
    print(f"$ python launchers/{name}.py {' '.join(argv)}", flush=True)
    try:
        launcher(name)(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise UserError(f"launchers/{name}.py exited {exc.code}") from None


@contextlib.contextmanager
def redirected(log: Path):
    """Send fds 1 and 2 (Python and C level) to ``log`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _last_error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if ln.startswith("error:")]
    return errs[-1] if errs else ""


# ---- the stage kinds -----------------------------------------------------------------------------

def _final_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (checkpoints/latest), 0 when there is none."""
    latest = run_dir / "checkpoints" / "latest"
    try:
        name = latest.read_text().strip() if latest.is_file() else os.readlink(latest)
    except OSError:
        return 0
    digits = "".join(ch for ch in Path(name).name if ch.isdigit())
    return int(digits) if digits else 0


def run_train(stage: Dict[str, Any], d: Path, root: Path) -> Dict[str, Any]:
    spec = stage["spec"]
    sets = list(spec["sets"]) + [f"training.run_dir={d / 'run'}"]
    if spec.get("parent"):
        sets.append(f"training.init_from={root / 'stages' / spec['parent'] / 'run'}")
    call("pretrain", ["--config", spec["config"], "--set", *sets])
    from megabd3.training.logging import read_metrics

    rows = read_metrics(d / "run")
    train = list(dict.fromkeys((r["step"], r["loss"]) for r in rows if r.get("kind") == "train"))
    evals = [r for r in rows if r.get("kind") == "eval"]
    want = next((int(x.split("=", 1)[1]) for x in reversed(spec["sets"]) if x.startswith("training.steps=")), None)
    reached = _final_step(d / "run")
    if want is not None and reached < want:
        # a SIGTERM/SIGUSR1 makes the launcher save and exit 0: that is an interruption, not a finished stage
        raise UserError(f"training stopped at step {reached} of {want} (interrupted); rerun to resume from its checkpoint")
    if train and all(loss == 0.0 for _, loss in train):
        raise UserError("the training loss was exactly 0 at every logged step: nothing was trained")
    return {"loss_curve": train, "final_valid": evals[-1] if evals else None, "steps": train[-1][0] if train else 0}


def _eval_results(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


def weighted_ppl(checkpoint: Path, sets: List[str], seed: int = 1) -> Dict[str, float]:
    """The fork's metric (spec 9.3): exp of the *weighted* training loss on the test split, token-averaged."""
    import torch

    from megabd3.data.loader import build_loader
    from megabd3.diffusion.objectives import build_objective
    from megabd3.eval.inference import load_model
    from megabd3.eval.padding import real_rows

    cfg, model, tok = load_model(str(checkpoint), sets)
    objective = build_objective(cfg, tok.mask_id, tok.model_vocab_size)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(build_loader(cfg, "test", 0, 1, 0, cfg.eval.batch_size)):
            if cfg.eval.max_batches and i >= cfg.eval.max_batches:
                break
            batch = real_rows(batch)  # all-padding rows would take strata (megabd3/eval/padding.py)
            if batch["input_ids"].shape[0] == 0:
                continue
            out = objective(model, batch["input_ids"], gen, train=True, attention_mask=batch.get("attention_mask"))
            total += float(out.per_token.double().sum())
            count += int(out.token_count)
    nelbo = total / max(count, 1)
    return {"weighted_nelbo": nelbo, "weighted_ppl": math.exp(nelbo) if nelbo < 700 else float("inf")}


def _device() -> List[str]:
    """Evaluate and judge on the GPU when there is one (the launchers default to cpu)."""
    import torch

    return ["--device", "cuda"] if torch.cuda.is_available() else []


def run_eval(stage: Dict[str, Any], d: Path, root: Path) -> Dict[str, Any]:
    spec = stage["spec"]
    ckpt = root / "stages" / spec["train"] / "run"
    out = d / "results.json"
    argv = ["--checkpoint", str(ckpt), "--split", "test", "--out", str(out), "--no-progress", *_device()]
    if spec["sets"]:
        argv += ["--set", *spec["sets"]]
    call("evaluate", argv)
    res = _eval_results(out)
    metrics = dict(res["perplexity"]["test"])
    metrics["weights"] = res.get("weights")
    train_spec = json.loads((root / "stages" / spec["train"] / "stage.json").read_text()).get("spec", {})
    if train_spec.get("weighting", "none") != "none":
        metrics.update(weighted_ppl(ckpt, spec["sets"]))
    else:  # unweighted training: the fork's metric is the NELBO itself
        metrics.update(weighted_nelbo=metrics.get("nelbo"), weighted_ppl=metrics.get("ppl"))
    return metrics


def run_zeroshot(stage: Dict[str, Any], d: Path, root: Path) -> Dict[str, Any]:
    spec = stage["spec"]
    from megabd3.experiments.prepare import zero_shot_labels

    if not spec.get("prefix") or not Path(str(spec["prefix"]) + ".idx").is_file():
        why = zero_shot_labels().get(spec["target"], ("", ""))[1] or f"dataset {spec.get('prefix')} not found"
        raise UserError(why)
    ckpt = root / "stages" / spec["train"] / "run"
    out = d / "results.json"
    argv = ["--checkpoint", str(ckpt), "--no-ppl", "--zero-shot", str(spec["prefix"]), "--out", str(out), "--no-progress",
            *_device()]
    if spec["sets"]:
        argv += ["--set", *spec["sets"]]
    call("evaluate", argv)
    res = _eval_results(out)["perplexity"]
    (value,) = res.values()
    return dict(value)


def run_sample(stage: Dict[str, Any], d: Path, root: Path) -> Dict[str, Any]:
    spec = stage["spec"]
    ckpt = root / "stages" / spec["train"] / "run"
    samples = d / "samples.jsonl"
    if not samples.is_file():
        call("sample", ["--checkpoint", str(ckpt), "--set", *spec["sets"], "--out", str(samples), "--no-progress", *_device()])
    rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
    lengths = [r["length"] for r in rows]
    res: Dict[str, Any] = {"n": len(rows), "median_length": statistics.median(lengths), "max_length": max(lengths),
                           "lengths": lengths, "mean_nfe": statistics.mean(r["nfe"] for r in rows),
                           "mean_entropy": statistics.mean(r["entropy"] for r in rows),
                           "stop_reasons": sorted({str(r.get("stop_reason")) for r in rows}),
                           "example": rows[0].get("text", "")[:400]}
    if spec.get("genppl"):
        out = d / "genppl.json"
        call("evaluate", ["--samples", str(samples), "--judge", str(spec["judge"]), "--out", str(out), "--no-progress",
                          *_device()])
        g = json.loads(out.read_text())["gen_ppl"]
        res.update({f"judge_{k}" if k in res else k: v for k, v in g.items() if isinstance(v, (int, float, str))})
        res["gen_ppl"] = g["mean_ppl"]  # the reference's table value: mean of per-sample PPLs (spec 5.5)
    return res


def run_prepare(stage: Dict[str, Any], d: Path, root: Path) -> Dict[str, Any]:
    from megabd3.experiments.prepare import prepare
    from megabd3.experiments.profiles import get_profile

    return prepare(get_profile(stage["spec"]["profile"]), root)


KINDS: Dict[str, Callable[[Dict[str, Any], Path, Path], Dict[str, Any]]] = {
    "train": run_train, "eval": run_eval, "zeroshot": run_zeroshot, "sample": run_sample, "prepare": run_prepare,
}


def execute(stage: Dict[str, Any], root: str, threads: int = 0) -> Dict[str, Any]:
    """Run one stage dict (``Stage`` as a dict); write and return its stage.json content."""
    root_p = Path(root)
    d = root_p / "stages" / stage["key"]
    d.mkdir(parents=True, exist_ok=True)
    prior = status_of(d)
    if prior.get("status") == "done":
        return prior
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    log = d / "log.txt"
    t0 = time.time()
    record: Dict[str, Any] = {"key": stage["key"], "kind": stage["kind"], "title": stage["title"], "spec": stage["spec"]}
    for dep in stage.get("deps", []):  # SLURM runs a stage whatever happened to its dependencies
        dep_rec = status_of(root_p / "stages" / dep)
        if dep_rec.get("status") != "done":
            why = dep_rec.get("reason", dep_rec.get("status", "not run"))
            record.update(status="failed", reason=f"dependency {dep_rec.get('title', dep)} is not done: {why}", wall_s=0.0)
            atomic_write_json(d / "stage.json", record, default=_json_default)
            return record
    atomic_write_json(d / "stage.json", {**record, "status": "running", "started": t0})
    try:
        with redirected(log):
            result = KINDS[stage["kind"]](stage, d, root_p)
        record.update(status="done", result=result)
    except UserError as exc:
        record.update(status="failed", reason=str(exc).splitlines()[0] if str(exc) else "failed")
        line = _last_error_line(log)
        if line and record["reason"].startswith("launchers/"):
            record["reason"] = line[len("error: "):]
    except BaseException as exc:  # noqa: BLE001 - a failing cell must never stop the others
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        record.update(status="failed", reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        if isinstance(exc, KeyboardInterrupt):
            raise
    record["wall_s"] = time.time() - t0
    atomic_write_json(d / "stage.json", record, default=_json_default)
    return record


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
