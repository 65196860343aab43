"""One model and global batch, every strategy on 1, 2, 4 and 8 devices: tokens/s, parameter +
optimizer bytes per device (the compiler's), collective bytes per step (the HLO's), each beside
`headwise plan`'s prediction. A markdown table on stdout (docs/benchmarks.md keeps one).

    python benchmarks/mesh_scaling.py --devices 8          # simulated CPU devices
    python benchmarks/mesh_scaling.py --hardware h100      # on a machine with 8 GPUs

On simulated CPU devices the 8 "devices" share the machine's cores, so tokens/s shows only the
overhead of splitting; the bytes columns are exact on any machine.
"""
import argparse
import time


def meshes(n_devices: int) -> list[tuple[str, dict]]:
    """(strategy, mesh sizes) for every device count up to `n_devices` that each can use."""
    out = []
    for n in (1, 2, 4, 8):
        if n > n_devices:
            break
        if n == 1:
            out.append(("dp", dict(data=1)))
            continue
        out += [("dp", dict(data=n)), ("fsdp", dict(fsdp=n)), ("tp", dict(tensor=n))]
        if n >= 4:
            out.append(("fsdp+tp", dict(fsdp=n // 2, tensor=2)))
        if n == 8:
            out.append(("dp+fsdp+tp", dict(data=2, fsdp=2, tensor=2)))
    return out


def measure(cfg, sizes: dict, batch: int, steps: int, hardware: str) -> dict:
    """Compile one train step on the mesh, run it, and read what the compiler says."""
    import jax
    import numpy as np
    from headwise import parallel
    from headwise.model import param_axes
    from headwise.parallel.hardware import get_hardware
    from headwise.parallel.hlo import collective_bytes
    from headwise.parallel.plan import plan_step
    from headwise.train.config import MeshConfig, OptimConfig
    from headwise.train.layout import Layout, shard_state
    from headwise.train.optim import learning_rate, make_optimizer
    from headwise.train.state import abstract_state, create_state
    from headwise.train.step import make_train_step

    mesh_cfg = MeshConfig(**{"data": 1, **sizes})
    n = int(np.prod(list(sizes.values())))
    mesh = parallel.make_mesh(mesh_cfg, jax.devices()[:n])
    rules, strategy = parallel.resolve(mesh_cfg, mesh)
    optimizer = make_optimizer(OptimConfig(), steps + 1, param_axes(cfg))
    shardings = shard_state(abstract_state(cfg, optimizer), cfg, Layout(mesh, rules, strategy))
    step = make_train_step(cfg, optimizer, learning_rate(OptimConfig(), steps + 1), 1, shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.context_length + 1), dtype=np.int32)
    data = parallel.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                shardings.batch)
    state = create_state(cfg, optimizer, 0, shardings.state)
    compiled = step.lower(state, data).compile()
    state, metrics = step(state, data)  # warm up
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - started) / steps
    plan = plan_step(cfg, dict(mesh.shape), rules, get_hardware(hardware), batch, strategy=strategy)
    rows = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    batch_bytes = 2 * rows * cfg.context_length * 4
    return {"strategy": strategy, "mesh": "x".join(str(mesh.shape[a]) for a in parallel.AXES),
            "devices": n, "tokens_per_s": batch * cfg.context_length / seconds,
            "state_xla": compiled.memory_analysis().argument_size_in_bytes - batch_bytes,
            "state_plan": plan.params_bytes + plan.optimizer_bytes,
            "collective_xla": sum(collective_bytes(compiled.as_text()).values()),
            "collective_plan": sum(c.operand_bytes for c in plan.collectives),
            "step_s_plan": plan.step_time_s}


def table(results: list[dict]) -> str:
    lines = ["| strategy | mesh (data x fsdp x tensor) | tokens/s | state bytes/device: XLA | "
             "plan | collective bytes/step: HLO | plan | plan's step time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['strategy']} | {r['mesh']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['state_xla']:,} | {r['state_plan']:,} | {r['collective_xla']:,} | "
                     f"{r['collective_plan']:,.0f} | {r['step_s_plan'] * 1e3:.3g} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, help="simulate N CPU devices (default: the real ones)")
    parser.add_argument("--hardware", default="cpu", help="the plan's hardware (default: cpu)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mesh")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    from headwise.parallel.launch import simulate_cpu_devices
    if args.devices:
        simulate_cpu_devices(args.devices)
    import jax
    from headwise.model import ModelConfig, count_params
    cfg = ModelConfig(vocab_size=256, context_length=128, d_model=128, n_heads=8, d_head=16,
                      n_layers=4, d_mlp=512)
    print(f"model: {count_params(cfg)['total']:,} parameters ({cfg.n_layers} layers, "
          f"{cfg.n_heads} heads of {cfg.d_head}, d_model {cfg.d_model}); batch {args.batch} x "
          f"{cfg.context_length}; {len(jax.devices())} {jax.devices()[0].device_kind} device(s)",
          flush=True)
    results = []
    for strategy, sizes in meshes(len(jax.devices())):
        results.append(measure(cfg, sizes, args.batch, args.steps, args.hardware))
        assert results[-1]["strategy"] == strategy, results[-1]
        print(f"  {results[-1]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
