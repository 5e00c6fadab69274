"""Speed and peak memory, measured the same way for every model, each in a process of its own.

Prefill is one forward over ``batch x prompt_len`` tokens; decode is ``new_tokens`` greedy steps of one token per
row through the KV cache that prefill built (generation's inner loop, without sampling or stopping). Both report the
median over ``repeats`` runs after one warm-up run. Token ids are drawn from a seeded generator, so every model sees
the same inputs when the vocabularies match.

Peak memory comes from the measuring process alone, so earlier work in the caller cannot inflate it, and counts
what holding and running the model costs (loading transients such as dtype conversion are excluded): on CUDA,
``torch.cuda.max_memory_allocated`` with the peak reset after loading; on Linux CPUs, the kernel's peak resident set
(VmHWM, reset through ``/proc/self/clear_refs`` after loading) minus the resident set before loading, i.e. weights +
activations + KV cache + allocator overhead.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict

import torch
from transformers import AutoModelForCausalLM

import whelp.models
from whelp import store
from whelp.architecture import config_hash, kv_cache_name
from whelp.errors import WhelpError
from whelp.models import load_config
from whelp.schema import from_dict, to_dict
from whelp.specs import EvalSpec, LoadPolicy, SpeedSpec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _run_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of prefill over ``ids`` [B, L] and of ``new_tokens`` cached greedy decode steps."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(ids.device)
    prefill = time.perf_counter() - start
    name = kv_cache_name(model.forward)
    past, token = out[name], out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: past})
        past, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return prefill, time.perf_counter() - start


def measure_speed(model, spec: SpeedSpec) -> dict:
    """Prefill and decode throughput of an in-memory model, in tokens per second (batch rows x tokens / s)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(vocab, (spec.batch_size, spec.prompt_len), generator=generator).to(model.device)
    _run_once(model, ids, min(spec.new_tokens, 2))
    runs = [_run_once(model, ids, spec.new_tokens) for _ in range(spec.repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens_per_s": spec.batch_size * spec.prompt_len / prefill,
        "decode_tokens_per_s": spec.batch_size * spec.new_tokens / decode,
    }


def shape_speed(config, device: str, spec: SpeedSpec) -> dict:
    """``measure_speed`` of the model ``config`` describes, with random weights (speed does not depend on their
    values), cached in ``$WHELP_HOME/speed`` per architecture, device, torch version and spec: a shape search
    times each candidate shape once."""
    key = store.content_id(
        [
            config_hash(config),
            device,
            torch.__version__,
            asdict(spec),
            torch.cuda.get_device_name(device) if device.startswith("cuda") else os.cpu_count(),
        ]
    )
    path = store.whelp_home() / "speed" / f"{key}.json"
    if path.is_file():
        return store.read_record(path, f"delete {path}")
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    result = measure_speed(model, spec)
    store.write_record(path, result)
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux >= 4.0 only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(model_name: str, spec: EvalSpec, policy: LoadPolicy) -> dict:
    """Load ``model_name`` in this process and measure it (the body of the child process)."""
    with torch.device("meta"):  # import the model's code first, so that its import is not counted
        AutoModelForCausalLM.from_config(load_config(model_name, policy), trust_remote_code=policy.trust_remote_code)
    cuda = spec.device.startswith("cuda")
    baseline = 0 if cuda or not os.path.exists("/proc/self/status") else _status_kib("VmRSS")
    model, _ = whelp.models.load_model(model_name, dtype=spec.dtype, device=spec.device, policy=policy)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_ok = baseline > 0 and _reset_peak_rss()  # after loading: dtype-conversion transients are not counted
    result = measure_speed(model, spec.speed)
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    elif rss_ok:
        peak, how = (_status_kib("VmHWM") - baseline) * 1024, "peak RSS while running (VmHWM) - RSS before loading"
    else:
        peak, how = None, "unavailable: needs Linux /proc/self/clear_refs"
    return {**result, "peak_memory_bytes": peak, "peak_memory_method": how, "torch_threads": torch.get_num_threads()}


class SpeedProcess:
    """A measuring process shared by many models. It imports torch and transformers once, while the caller goes on
    with other work, then forks a fresh child per model, so that each model's speed and peak memory are measured
    alone (the child's peak counts from its own baseline) and no model pays the imports again.

    Used as a context manager; ``measure`` blocks until that model's child is done, so the caller should be idle
    by then (its work would slow the timed runs)."""

    def __init__(self, policy: LoadPolicy = LoadPolicy()):
        self._policy = policy
        self._errors = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "whelp.evals.speed", json.dumps(asdict(policy))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )

    def measure(self, model_name: str, spec: EvalSpec) -> dict:
        """Speed and peak memory of ``model_name`` loaded as ``spec`` says, in a forked child of the process."""
        try:
            self._proc.stdin.write(json.dumps({"model": model_name, "eval": to_dict(spec)}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process is gone: readline says so below
        reply = json.loads(self._proc.stdout.readline() or "{}")
        if "speed" not in reply:
            self._errors.seek(0)
            tail = reply.get("error") or (self._errors.read().strip().splitlines() or ["no output"])[-1]
            raise WhelpError(f"speed measurement of {model_name} failed in its subprocess: {tail}")
        return reply["speed"]

    def measure_each(self, models: Mapping[str, str], spec: EvalSpec) -> dict[str, dict]:
        """``measure`` of each ``{label: model}``, one after another. A model of the same architecture and stored
        dtype as one measured before it (a pruned student and the same student distilled) gets that one's numbers,
        which do not depend on the weights' values (as ``shape_speed``'s), marked ``same_as`` its label."""
        first: dict[tuple, str] = {}
        out: dict[str, dict] = {}
        for label, name in models.items():
            config = load_config(name, self._policy)
            key = (config_hash(config), str(getattr(config, "dtype", None)))
            if key in first:
                out[label] = {**out[first[key]], "same_as": first[key]}
            else:
                first[key], out[label] = label, self.measure(name, spec)
        return out

    def __enter__(self) -> SpeedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=None if exc[0] is None else 5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._errors.close()


def _serve(policy: LoadPolicy) -> None:
    """The measuring process: one JSON request per stdin line, one JSON reply per stdout line. Each model is measured
    by a forked child, which inherits the imports but none of the other models' memory."""
    for module in ("transformers.modeling_utils", "transformers.models.auto.modeling_auto"):
        importlib.import_module(module)  # what every child needs, imported once before any fork

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, reply through the pipe, exit without running the parent's cleanup
            os.close(read_end)
            try:
                reply = {"speed": _measure(request["model"], from_dict(EvalSpec, request["eval"], "eval"), policy)}
            except BaseException as exc:  # noqa: BLE001  (every failure becomes the reply's one line)
                reply = {"error": str(exc) or type(exc).__name__}
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(reply))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answer:
            reply = answer.read()
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(reply or json.dumps({"error": f"the measuring process died (status {status})"}), flush=True)


if __name__ == "__main__":
    _serve(LoadPolicy(**json.loads(sys.argv[1])))
