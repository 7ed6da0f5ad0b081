"""Compile-only (deviceless AOT) measurements of jxent against jax.nn / optax, H100 and TPU v5e.

Run with the AOT venv (jax-cuda12-plugin + libtpu, see /work/shared/README.md):

    JAX_PLATFORMS=cpu PYTHONPATH=. AOT_H100_CONFIG=h100_sxm.txtpb \
        /work/aot-venv/bin/python benchmarks/aot_kernels.py [h100,v5e] [cases] [dtypes] [fwd,fwdbwd]

AOT_H100_CONFIG: XLA's xla/backends/gpu/target_config/specs/h100_sxm.txtpb without the
field collective_memory_granularity (which jaxlib 0.10.2 cannot parse). Prints, per case:
bytes accessed / floor (floor: read the logits once, plus write the gradient once for
fwdbwd), compiled temporaries (MiB), kernel count and, on TPU, the cost-model time; each
against the reference. DUMP=dir writes the optimised HLO; JSON=file the rows.
"""

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
import jax
import jax.numpy as jnp
import optax
from jax._src.lib import _jax
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

N, C = int(os.environ.get("N", 8192)), int(os.environ.get("C", 32000))
MiB = 2**20


def target(name):
    if name == "h100":
        text = Path(os.environ.get("AOT_H100_CONFIG", "h100_sxm.txtpb")).read_text()
        topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
    else:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name="v5e:1x1",
            chip_config_name="default",
            chips_per_host_bounds=(1, 1, 1),
            num_slices=1,
        )
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    return NamedSharding(mesh, P())


CPU_CLIENT = jax.devices("cpu")[0].client


def analyse(fn, args, sharding):
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    comp = jax.jit(fn).lower(*specs).compile()
    text = comp.as_text()
    mem = comp.memory_analysis()
    ca = comp.cost_analysis()
    if not ca:
        mod = comp.runtime_executable().hlo_modules()[0]
        ca = _jax.hlo_module_cost_analysis(CPU_CLIENT, mod)
    if isinstance(ca, list):
        ca = ca[0]
    # kernels: fusion instructions / custom-calls / reduce etc. in the entry computation
    entry = text[text.index("ENTRY") :]
    entry[: entry.index("\n}")]
    kernels = count_kernels(text)
    return dict(
        temp=mem.temp_size_in_bytes / MiB,
        bytes=ca.get("bytes accessed", float("nan")),
        secs=ca.get("optimal_seconds", float("nan")),
        kernels=kernels,
        text=text,
    )


KOPS = (
    r"\s(fusion|custom-call|reduce|scatter|gather|sort|copy|transpose|while|convolution|dot"
    r"|select-and-scatter|reduce-window|all-reduce)\("
)


def count_kernels(text):
    entry = text[text.index("ENTRY") :]
    body = entry[: entry.index("\n}")]
    return sum(1 for line in body.splitlines() if re.search(KOPS, line))


def mean_ce_int(f):
    return lambda x, y: jnp.mean(f(x, y))


def cases(dtype):
    x = jax.ShapeDtypeStruct((N, C), dtype)
    y = jax.ShapeDtypeStruct((N,), jnp.int32)
    g = jax.ShapeDtypeStruct((N, C), dtype)
    gN = jax.ShapeDtypeStruct((N,), jnp.float32)
    t = jax.ShapeDtypeStruct((N, C), dtype)

    def vg(loss, nargs=2):
        return lambda *a: jax.value_and_grad(lambda x, *r: loss(x, *r))(*a)

    def vjp_rowwise(f):
        # normaliser: forward output + vjp with a cotangent g of the output's shape
        def run(x, g):
            out, back = jax.vjp(f, x)
            return out, back(g.astype(out.dtype))[0]

        return run

    ce_int = lambda f: lambda x, y: jnp.mean(f(x, y))
    nll_ref = lambda lp, y: -jnp.take_along_axis(lp.astype(jnp.float32), y[:, None], -1)[:, 0]
    return {
        "int_ce": (
            (x, y),
            ce_int(jxent.softmax_cross_entropy_with_integer_labels),
            ce_int(optax.softmax_cross_entropy_with_integer_labels),
        ),
        "cross_entropy": (
            (x, y),
            lambda x, y: jxent.cross_entropy(x, y),
            ce_int(optax.softmax_cross_entropy_with_integer_labels),
        ),
        "dense_ce": (
            (x, t),
            lambda x, t: jnp.mean(jxent.softmax_cross_entropy(x, t)),
            lambda x, t: jnp.mean(optax.softmax_cross_entropy(x, t)),
        ),
        "nll": ((x, y), ce_int(jxent.nll_loss), ce_int(nll_ref)),
        "bce": (
            (x, t),
            lambda x, t: jnp.mean(jxent.sigmoid_binary_cross_entropy(x, t)),
            lambda x, t: jnp.mean(optax.sigmoid_binary_cross_entropy(x, t)),
        ),
        "kl": (
            (x, t),
            lambda x, t: jnp.mean(jxent.kl_divergence(x, t)),
            lambda x, t: jnp.mean(optax.kl_divergence(x, t)),
        ),
        "kl_log": (
            (x, t),
            lambda x, t: jnp.mean(jxent.kl_divergence_with_log_targets(x, t)),
            lambda x, t: jnp.mean(
                jnp.sum(
                    jnp.exp(t.astype(jnp.float32))
                    * (t.astype(jnp.float32) - x.astype(jnp.float32)),
                    -1,
                )
            ),
        ),
        "logsumexp": (
            (x, gN),
            lambda x: jxent.logsumexp(x, axis=-1),
            lambda x: jax.nn.logsumexp(x, axis=-1),
        ),
        "softmax": ((x, g), jxent.softmax, jax.nn.softmax),
        "log_softmax": ((x, g), jxent.log_softmax, jax.nn.log_softmax),
    }


NORMALISERS = {"logsumexp", "softmax", "log_softmax"}


def build(name, args, f, mode):
    if name in NORMALISERS:
        if mode == "fwd":
            return (lambda x: f(x)), args[:1]

        def run(x, g):
            out, back = jax.vjp(f, x)
            return out, back(g.astype(out.dtype))[0]

        return run, args
    if mode == "fwd":
        return f, args
    return jax.value_and_grad(f), args


def main():
    targets = sys.argv[1].split(",") if len(sys.argv) > 1 else ["h100", "v5e"]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else None
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["float32", "bfloat16"]
    modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["fwd", "fwdbwd"]
    dump = os.environ.get("DUMP")
    rows = []
    for tname in targets:
        sh = target(tname)
        for dt in dtypes:
            dtype = jnp.dtype(dt)
            floor = 2 * N * C * dtype.itemsize
            for name, (args, mine, ref) in cases(dtype).items():
                if only and name not in only:
                    continue
                for mode in modes:
                    res = {}
                    for who, f in (("jxent", mine), ("ref", ref)):
                        fn, a = build(name, args, f, mode)
                        try:
                            r = analyse(fn, a, sh)
                        except Exception as e:
                            print("ERR", tname, dt, name, mode, who, repr(e)[:300])
                            continue
                        if dump:
                            path = Path(dump) / f"{tname}_{dt}_{name}_{mode}_{who}.hlo"
                            path.write_text(r["text"])
                        res[who] = r
                    if len(res) < 2:
                        continue
                    j, rf = res["jxent"], res["ref"]
                    fl = floor if mode == "fwdbwd" else floor / 2
                    row = dict(
                        t=tname,
                        dt=dt,
                        case=name,
                        mode=mode,
                        j_bytes=j["bytes"] / fl,
                        r_bytes=rf["bytes"] / fl,
                        j_temp=j["temp"],
                        r_temp=rf["temp"],
                        j_k=j["kernels"],
                        r_k=rf["kernels"],
                        j_ms=j["secs"] * 1e3,
                        r_ms=rf["secs"] * 1e3,
                    )
                    flag = ""
                    if j["temp"] > rf["temp"] + 1 or j["bytes"] > rf["bytes"] * 1.0001:
                        flag = "  <-- WORSE"
                    print(
                        f"{tname:4} {dt:8} {name:13} {mode:6} bytes/floor {row['j_bytes']:.2f} "
                        f"(ref {row['r_bytes']:.2f})  temp {j['temp']:8.1f} "
                        f"(ref {rf['temp']:8.1f}) MiB  kernels {j['kernels']} (ref {rf['kernels']})"
                        f"  ms {row['j_ms']:.2f} ({row['r_ms']:.2f}){flag}",
                        flush=True,
                    )
                    rows.append(row)
    if os.environ.get("JSON"):
        Path(os.environ["JSON"]).write_text(json.dumps(rows, indent=1))


main()
