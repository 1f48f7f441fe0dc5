"""2:4 inference speed: dense against PyTorch's semi-structured sparse kernels.

    python benchmarks/bench_inference.py                                  # default run + LLaMA-7B-shaped stack
    python benchmarks/bench_inference.py --run-dir results/my-run --variant sparsegpt-2of4
    python benchmarks/bench_inference.py --model-dir results/my-run/sparsegpt-2of4/model --no-llama7b
    python benchmarks/bench_inference.py --batches 1 8 32 --prompt 512 --new-tokens 64 --backend cutlass

Measures, per batch size (default 1, 8, 32): prefill latency (one forward over
batch x prompt tokens, no cache) and decode throughput (tokens/s generating
`--new-tokens` tokens one at a time with the KV cache, greedy), for the dense
model and for the same model with every 2:4-sparse decoder Linear replaced by
`torch.sparse.to_sparse_semi_structured(weight)` (cuSPARSELt when PyTorch has
it, else CUTLASS; `--backend` forces one). Models: the run's own (a 2:4
variant's reassembled directory, or, when the run has none, its dense model
with a magnitude 2:4 mask applied here: speed does not depend on which
weights are zero) and a LLaMA-7B-shaped stack (hidden 4096, intermediate
11008, 32 heads, `--llama7b-layers` decoder layers, random 2:4 weights).

These kernels need a CUDA GPU of compute capability 8.0 or newer (Ampere,
Hopper). Anywhere else the script prints one line saying that no accelerated
2:4 path exists on this machine, measures nothing and exits 0: a 2:4 model
there runs at dense speed (the compressed export saves disk, not time).
`--check` runs the whole harness on the CPU with dense weights in both
columns (a test of the script, not a measurement). Nothing here concerns
vLLM, which this benchmark does not run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from common import header, table  # noqa: E402

DEFAULT_RUN = REPO / "results" / "smollm2-demo"
LLAMA7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)


# ---------------------------------------------------------------- is there an accelerated path?


def accelerated_path(backend: str = "auto") -> tuple[str | None, str]:
    """(backend, description), or (None, why not): semi-structured kernels that actually run here."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 0):
        return None, f"{name} has compute capability {major}.{minor}; the 2:4 kernels need 8.0+"
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        weight = torch.tensor([0, 0, 1, 1], dtype=torch.float16, device="cuda").tile((128, 32))
        weight = weight * torch.randn_like(weight)
        x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
        got = torch.nn.functional.linear(x, to_sparse_semi_structured(weight))
        want = torch.nn.functional.linear(x, weight)
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
            return None, f"{backend} semi-structured matmul gives wrong results on {name}"
    except Exception as exc:  # a missing kernel shows up as one of several error types
        return (
            None,
            f"{backend} semi-structured kernels fail on {name} ({str(exc).splitlines()[0]})",
        )
    return backend, f"{backend} on {name} (compute capability {major}.{minor})"


# ---------------------------------------------------------------- models


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input weights."""
    return (
        weight.ndim == 2
        and weight.shape[1] % 4 == 0
        and int((weight.reshape(-1, 4) != 0).sum(1).max()) <= 2
    )


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4: keep the 2 largest of every 4 input weights (for speed, not quality)."""
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        1, groups.abs().topk(2, dim=1).indices, True
    )
    return (groups * keep).reshape(weight.shape)


def decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    ]


def sparsify(model: torch.nn.Module, check: bool) -> tuple[int, list[str]]:
    """Decoder Linears -> semi-structured sparse weights; (converted, [skipped: why])."""
    converted, skipped = 0, []
    for name, module in decoder_linears(model):
        if not is_24(module.weight.data):
            skipped.append(f"{name}: not 2:4")
            continue
        if check:
            converted += 1  # dense weights in both columns: the harness, not the kernels
            continue
        from torch.sparse import to_sparse_semi_structured

        try:
            module.weight = torch.nn.Parameter(
                to_sparse_semi_structured(module.weight.data), requires_grad=False
            )
            converted += 1
        except RuntimeError as exc:  # shape or dtype the kernels do not take
            skipped.append(f"{name}: {str(exc).splitlines()[0][:80]}")
    return converted, skipped


def load_run_model(
    run_dir: Path, variant: str | None, model_dir: Path | None, dtype: torch.dtype, device: str
) -> tuple[str, Callable[[], torch.nn.Module]]:
    """The run's own model: a 2:4 variant if there is one, else its dense model with a 2:4 mask."""
    from transformers import AutoModelForCausalLM

    from rose.artifacts import read_json

    masked = False
    if model_dir is None:
        candidates = (
            [run_dir / variant / "model"] if variant else sorted(run_dir.glob("*-2of4/model"))
        )
        candidates = [c for c in candidates if (c / "config.json").is_file()]
        if candidates:
            model_dir = candidates[0]
        elif (run_dir / "model.json").is_file():
            model_dir, masked = Path(read_json(run_dir / "model.json")["path"]), True
        else:
            raise SystemExit(
                f"bench_inference: {run_dir} has no 2:4 variant and no model.json; pass --model-dir"
            )

    def build() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        if masked:
            with torch.no_grad():
                for _, module in decoder_linears(model):
                    module.weight.copy_(mask_24(module.weight))
        return model

    label = f"{model_dir.parent.name if model_dir.name == 'model' else model_dir.name}"
    return label + (" (dense + 2:4 mask)" if masked else ""), build


def llama7b_stack(
    layers: int, dtype: torch.dtype, device: str
) -> tuple[str, Callable[[], torch.nn.Module]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=layers, **LLAMA7B)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        with torch.no_grad():
            for _, module in decoder_linears(model):
                module.weight.copy_(mask_24(module.weight))
        return model

    return f"LLaMA-7B-shaped, {layers} layers", build


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_ms(model, ids: torch.Tensor, repeats: int, device: str) -> float:
    model(ids, use_cache=False)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(ids, use_cache=False)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _step(model, token: torch.Tensor, cache):
    """One decode step; transformers >= 5.2x names the cache `cache`, older ones `past_key_values`."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(token, use_cache=True, **{name: cache})
    return out.logits[:, -1:].argmax(-1), getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def decode_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    token, cache = _step(model, ids, None)
    _step(model, token, cache)  # warm-up step; the prompt is run again below for a clean cache
    token, cache = _step(model, ids, None)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token, cache = _step(model, token, cache)
    _sync(device)
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def measure(
    label: str, build: Callable[[], torch.nn.Module], args, device: str, check: bool
) -> list[list]:
    rows = []
    model = build()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (1, min(args.prompt, 64)), generator=generator).to(device)
    inputs = {
        b: torch.randint(0, vocab, (b, args.prompt), generator=generator).to(device)
        for b in args.batches
    }
    dense = {
        b: (
            prefill_ms(model, ids, args.repeats, device),
            decode_tokens_per_s(model, ids, args.new_tokens, device),
        )
        for b, ids in inputs.items()
    }
    with torch.no_grad():
        reference = model(probe).logits.float()
    converted, skipped = sparsify(model, check)
    with torch.no_grad():
        drift = (model(probe).logits.float() - reference).abs().max().item()
    for batch, ids in inputs.items():
        sparse = (
            prefill_ms(model, ids, args.repeats, device),
            decode_tokens_per_s(model, ids, args.new_tokens, device),
        )
        base = dense[batch]
        rows.append(
            [
                label,
                batch,
                args.prompt,
                f"{base[0]:.2f}",
                f"{sparse[0]:.2f}",
                f"{base[0] / sparse[0]:.2f}x",
                f"{base[1]:.1f}",
                f"{sparse[1]:.1f}",
                f"{sparse[1] / base[1]:.2f}x",
                f"{converted}/{converted + len(skipped)}",
                f"{drift:.2e}",
            ]
        )
    for line in skipped[:5]:
        print(f"  {label}: kept dense: {line}")
    if len(skipped) > 5:
        print(f"  {label}: ... {len(skipped) - 5} more kept dense")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


COLUMNS = [
    "model",
    "batch",
    "prompt",
    "prefill dense ms",
    "prefill 2:4 ms",
    "prefill speedup",
    "decode dense tok/s",
    "decode 2:4 tok/s",
    "decode speedup",
    "Linears on 2:4 kernels",
    "max logit change",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", type=Path, default=DEFAULT_RUN, help="run directory (default: %(default)s)"
    )
    parser.add_argument("--variant", help="a 2:4 variant of the run (default: the first *-2of4)")
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of the run's")
    parser.add_argument(
        "--no-run-model", action="store_true", help="only the LLaMA-7B-shaped stack"
    )
    parser.add_argument("--no-llama7b", action="store_true", help="only the run's model")
    parser.add_argument("--llama7b-layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill length)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--backend", choices=["auto", "cusparselt", "cutlass"], default="auto")
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the harness on the CPU with dense weights in both columns (tests the script)",
    )
    args = parser.parse_args(argv)

    if args.check:
        device, where = (
            "cpu",
            "check mode: CPU, dense weights in both columns, nothing is a 2:4 measurement",
        )
    else:
        backend, where = accelerated_path(args.backend)
        if backend is None:
            print(
                f"bench_inference: no accelerated 2:4 path on this machine ({where}): nothing measured. "
                "PyTorch's semi-structured sparse kernels (cuSPARSELt, CUTLASS) need a CUDA GPU "
                "of compute capability 8.0+; elsewhere a 2:4 model runs at dense speed."
            )
            return 0
        device = "cuda"
    dtype = getattr(torch, args.dtype) if not args.check else torch.float32
    for line in header():
        print(line)
    print(f"2:4 path: {where}")
    print(
        f"prefill: median of {args.repeats} forwards over batch x {args.prompt} tokens; "
        f"decode: {args.new_tokens} greedy tokens per sequence with the KV cache; dtype {dtype}"
    )
    print()
    models = []
    if not args.no_run_model:
        models.append(load_run_model(args.run_dir, args.variant, args.model_dir, dtype, device))
    if not args.no_llama7b and not args.check:
        models.append(llama7b_stack(args.llama7b_layers, dtype, device))
    rows = []
    for label, build in models:
        rows += measure(label, build, args, device, args.check)
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
