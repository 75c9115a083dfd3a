"""Rendering plans as text: the memory of the worst device, the step time and its parts, throughput
and budget, and the assumptions, one per line (the same dicts are printed as JSON by --json)."""

from __future__ import annotations

from typing import Any


def gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def count(x: float) -> str:
    return f"{x / 1e9:,.2f}B" if x >= 1e9 else f"{x / 1e6:,.2f}M"


def seconds(x: float) -> str:
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def _rows(pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"  {k:<{width}}  {v}" for k, v in pairs]


def layout_line(r: dict[str, Any]) -> str:
    lo, d, cl = r["layout"], r["derived"], r["cluster"]
    return (f"{cl['n_gpus']} x {cl['gpu']}: pp {lo['pp']} {lo['schedule']}, dp_shard {d['dp_shard']}, ep {lo['ep']} "
            f"(dp {d['dp']}, ZeRO-{lo['zero']}), {lo['precision']}, recompute {lo['recompute']}, "
            f"micro-batch {lo['micro_batch']} x {lo['seq_len']}, {d['n_micro']} micro-batch(es) per step, "
            f"global batch {d['global_batch']}")


def training_text(r: dict[str, Any]) -> str:
    mem, t, tp = r["memory"], r["time"], r["throughput"]
    dev = mem["per_device"][mem["worst_device"]]
    lines = [f"{r['model']} on {layout_line(r)}", "",
             f"memory of the fullest GPU (device {mem['worst_device']} of the pipeline, "
             f"{count(dev['params_on_device'])} parameters, activations of {dev['micro_batches_held']:g} "
             "micro-batch(es) held):"]
    skip = ("total", "params_on_device", "micro_batches_held")
    lines += _rows([(k, gb(v)) for k, v in dev.items() if k not in skip])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    capacity = f"{gb(mem['hbm_bytes'])} ({r['cluster']['hbm_gb']:g} GiB)"
    lines += _rows([("total", f"{gb(dev['total'])} of {capacity}: {verdict}")])
    mb = t["micro_batch"]
    lines += ["", f"step time (critical device {t['critical_device']}; per micro-batch F {seconds(mb['F'])}, "
                  f"B {seconds(mb['B'])}, W {seconds(mb['W'])}, all-to-all {seconds(mb['comm_fwd'])} + "
                  f"{seconds(mb['comm_bwd'])}):"]
    lines += _rows([("compute", seconds(t["compute_s"])), ("  of which recomputation", seconds(t["recompute_s"])),
                    ("  of which memory-bound", seconds(t["memory_bound_s"])),
                    ("all-to-all exposed", seconds(t["exposed_all_to_all_s"])),
                    ("all-to-all hidden", seconds(t["hidden_all_to_all_s"])),
                    ("pipeline bubble", seconds(t["bubble_s"])), ("data-parallel sync", seconds(t["dp_sync_s"])),
                    ("FSDP gathers exposed", seconds(t["fsdp_exposed_s"])),
                    ("optimizer step", seconds(t["optimizer_s"])),
                    ("step", seconds(t["step_s"]))])
    a2a = t["all_to_all_per_token_per_moe_layer"]
    lines.append(f"  per token per MoE layer: {a2a['network_copies']:.2f} copies over the network, "
                 f"{a2a['nvlink_copies']:.2f} over NVLink (node limit {r['derived']['node_limit']} of "
                 f"{r['derived']['ep_nodes']} EP nodes)")
    lines += ["", "throughput:"]
    pairs = [("tokens/s", f"{tp['tokens_per_s']:,.0f}"), ("tokens/day", f"{tp['tokens_per_day'] / 1e9:,.1f}B")]
    if tp["mfu_bf16_peak"] is not None:
        pairs.append(("MFU (bf16 peak)", f"{tp['mfu_bf16_peak']:.1%}"))
    if tp["precision_peak"] != "bf16":
        pairs.append((f"MFU ({tp['precision_peak']} peak)", f"{tp['mfu_precision_peak']:.1%}"))
    lines += _rows(pairs)
    if "budget" in r:
        b = r["budget"]
        usd = ("no price: pass --usd-per-gpu-hour" if b["usd"] is None
               else f"${b['usd'] / 1e6:,.3f}M at ${b['usd_per_gpu_hour']:g}/GPU-hour")
        lines += ["", f"budget of {b['tokens'] / 1e12:g}T tokens:"]
        lines += _rows([("GPU-hours", f"{b['gpu_hours'] / 1e6:,.3f}M"), ("days", f"{b['days']:,.1f}"), ("cost", usd)])
    lines += ["", "assumptions:"] + [f"  - {a}" for a in r["assumptions"]]
    return "\n".join(lines)


def sweep_text(s: dict[str, Any]) -> str:
    lines = [f"{s['tried']} layouts tried: {s['invalid']} invalid, {s['do_not_fit']} do not fit, "
             f"{s['feasible']} feasible; fastest first:", ""]
    header = f"  {'step':>9}  {'MFU':>6}  {'peak mem':>9}  layout"
    lines.append(header)
    for r in s["top"]:
        lo, d = r["layout"], r["derived"]
        mfu = r["throughput"]["mfu_bf16_peak"]
        lines.append(f"  {seconds(r['time']['step_s']):>9}  {'-' if mfu is None else f'{mfu:.1%}':>6}  "
                     f"{r['memory']['peak_bytes'] / 1e9:>6.1f} GB  pp {lo['pp']} {lo['schedule']}, ep {lo['ep']}, "
                     f"dp {d['dp']}, ZeRO-{lo['zero']}, recompute {lo['recompute']}, {d['n_micro']} micro-batches")
    if s["top"]:
        lines += ["", "assumptions (all rows):"] + [f"  - {a}" for a in s["top"][0]["assumptions"]]
    return "\n".join(lines)


def serving_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for s in rows:
        lines += [f"{s['model']} served on {s['gpu']} ({s['hbm_gb']:g} GiB), {s['weight_dtype']} weights, "
                  f"{s['kv_dtype']} KV cache, {s['context']:,}-token requests:"]
        lines += _rows([
            ("weights", f"{gb(s['weight_bytes'])} over {s['replica_gpus']} GPU(s): {gb(s['weights_per_gpu'])} each"),
            ("KV cache per token", f"{s['kv_bytes_per_token']:,.0f} B"),
            ("KV cache per request", gb(s["kv_bytes_per_request"])),
            ("free per GPU", gb(s["free_bytes_per_gpu"])),
            ("requests per GPU", f"{s['requests_per_gpu']:,.2f}"),
            ("requests per node", f"{s['requests_per_node']:,}"),
        ])
        lines += [f"  - {a}" for a in s["assumptions"]] + [""]
    return "\n".join(lines).rstrip()
