"""`lamp bench pooling`'s samples as rows, ratios and what each theory column claims.

Ratios are paired: a variant's time over the p = 1 variant's of the same (engine, state, l) in the
same round (a noisy minute hits both), then the median over rounds. Counts (positions computed,
KV bytes) do not vary between rounds; they are checked against their formulas exactly.
"""

from __future__ import annotations

import dataclasses
import statistics

from ..prompts.math import pooled_length
from .stats import safe_ratio, summarize

# What each theory column claims, and so where it is compared with the measured one.
CLAIMS = {
    "cold": "prefill runs the pooled prompt and the input: its time over p = 1's is (L_x + ceil(l/p)) / (L_x + l), "
            "if the cost is proportional to the positions computed ('+ fixed': with the fitted fixed cost per "
            "prefill added to both sides)",
    "off": "the same as cold: without the cache every prefill runs the pooled prompt and the input",
    "warm": "the prompt's keys/values are cached: only the L_x input positions run, whatever p, so the ratio is "
            "~1 (the inputs attend over ceil(l/p) fewer keys: slightly below 1 at most)",
    "ttft": "no theory of its own: TTFT is the engine's wait for a batch (batch_wait_ms) plus the prefill",
    "kv_bytes": "exact: a running request holds (L_x + ceil(l/p)) x kv_bytes_per_token after its prefill",
    "decode": "a step reads every weight once plus L_x + ceil(l/p) cached keys/values per layer: its time over "
              "p = 1's lies between 1 and the keys ratio; the fit step = fixed + per_key x keys says where",
}


def report(config, samples: dict, engines: dict) -> dict:
    prefill = [prefill_row(v, samples, engines) for v in samples if v[0] == "prefill"]
    fits = prefill_fits(prefill)
    for row in prefill:
        fit = fits.get((row["engine"], row["state"]))
        row["fixed_cost_theory"] = None if fit is None else safe_ratio(
            fit["fixed_ms"] + fit["per_position_ms"] * (row["input_tokens"] + row["soft_tokens"]),
            fit["fixed_ms"] + fit["per_position_ms"] * (row["input_tokens"] + row["l"]))
    decode = [decode_row(v, samples) for v in samples if v[0] == "decode"]
    return {
        "bench": "pooling",
        "config": dataclasses.asdict(config),
        "engines": engines,
        "claims": CLAIMS,
        "prefill": prefill,
        "prefill_fit": [{"engine": k, "state": s, **fit} for (k, s), fit in fits.items()],
        "agreement": agreement(prefill),
        "decode": decode,
        "decode_fit": decode_fits(decode),
        "samples": {"/".join(map(str, v)): s for v, s in samples.items()},
    }


def paired_ratio(samples: dict, variant: tuple, base: tuple, key: str) -> dict:
    return summarize([safe_ratio(a[key], b[key]) for a, b in zip(samples[variant], samples[base])]).as_dict()


def prefill_row(variant: tuple, samples: dict, engines: dict) -> dict:
    _, kind, state, length, pool = variant
    own, last = samples[variant], samples[variant][-1]
    base = ("prefill", kind, state, length, 1)
    lx, soft = last["input_tokens"], pooled_length(length, pool)
    per_token = engines[kind]["kv_bytes_per_token"]
    prefill, ttft = paired_ratio(samples, variant, base, "prefill_ms"), paired_ratio(samples, variant, base, "ttft_ms")
    return {
        "engine": kind, "state": state, "l": length, "pool": pool, "input_tokens": lx, "soft_tokens": soft,
        "computed_positions": last["computed_positions"],
        "expected_computed_positions": lx + (0 if state == "warm" else soft),
        "kv_bytes": last["kv_bytes"], "expected_kv_bytes": (lx + soft) * per_token,
        "prompt_kv_entry_bytes": last["prompt_kv_entry_bytes"],
        "prefill_ms": summarize([s["prefill_ms"] for s in own]).median,
        "ttft_ms": summarize([s["ttft_ms"] for s in own]).median,
        "theory": 1.0 if state == "warm" else (lx + soft) / (lx + length),
        "measured_ratio": prefill["median"], "ttft_ratio": ttft["median"],
        "retaken": sum(s["retaken"] for s in own),
        "spread": {"prefill_ms": summarize([s["prefill_ms"] for s in own]).as_dict(),
                   "measured_ratio": prefill, "ttft_ratio": ttft},
    }


def prefill_fits(rows: list[dict]) -> dict:
    """Least squares prefill_ms = fixed + per_position x positions computed, per (engine, cold | off):
    a fixed cost per prefill (reading the weights, a prompt-KV build's own forward) keeps measured
    ratios above the proportional theory where few positions run."""
    fits = {}
    for key in sorted({(r["engine"], r["state"]) for r in rows if r["state"] != "warm"}):
        mine = [r for r in rows if (r["engine"], r["state"]) == key]
        positions = [r["computed_positions"] for r in mine]
        if len(set(positions)) >= 2:
            slope, intercept = statistics.linear_regression(positions, [r["prefill_ms"] for r in mine])
            fits[key] = {"fixed_ms": intercept, "per_position_ms": slope}
    return fits


def agreement(rows: list[dict]) -> list[dict]:
    """Measured minus theory over the p > 1 rows, per (engine, state): where the theory claims a ratio."""
    out = []
    for kind, state in sorted({(r["engine"], r["state"]) for r in rows}):
        mine = [r for r in rows if (r["engine"], r["state"]) == (kind, state) and r["pool"] != 1]
        if not mine:
            continue
        item = {"engine": kind, "state": state}
        for theory in ("theory", "fixed_cost_theory"):
            errors = [r["measured_ratio"] - r[theory] for r in mine if r[theory] is not None]
            if errors:
                item[theory] = {"mean_error": statistics.fmean(errors),
                                "max_abs_error": max(abs(e) for e in errors)}
        out.append(item)
    return out


def decode_row(variant: tuple, samples: dict) -> dict:
    _, kind, length, pool = variant
    own, last = samples[variant], samples[variant][-1]
    lx, soft = last["input_tokens"], pooled_length(length, pool)
    ratio = paired_ratio(samples, variant, ("decode", kind, length, 1), "step_ms")
    return {"engine": kind, "l": length, "pool": pool, "input_tokens": lx, "soft_tokens": soft,
            "keys": lx + soft, "kv_bytes": last["kv_bytes"], "step_ms": summarize([s["step_ms"] for s in own]).median,
            "keys_ratio": (lx + soft) / (lx + length), "measured_ratio": ratio["median"],
            "spread": {"step_ms": summarize([s["step_ms"] for s in own]).as_dict(), "measured_ratio": ratio}}


def decode_fits(rows: list[dict]) -> list[dict]:
    """Per engine, step_ms = fixed + per_key x keys (keys at the first decode step)."""
    out = []
    for kind in sorted({r["engine"] for r in rows}):
        mine = [r for r in rows if r["engine"] == kind]
        if len({r["keys"] for r in mine}) >= 2:
            slope, intercept = statistics.linear_regression([r["keys"] for r in mine], [r["step_ms"] for r in mine])
            out.append({"engine": kind, "fixed_ms": intercept, "per_key_ms": slope})
    return out


PREFILL_COLUMNS = (
    ("engine", "engine", "s"), ("state", "state", "s"), ("l", "l", "d"), ("pool", "p", "d"),
    ("input_tokens", "L_x", "d"), ("soft_tokens", "soft", "d"), ("computed_positions", "computed", "d"),
    ("kv_kb", "KV kB/req", ".0f"), ("prefill_ms", "prefill ms", ".1f"), ("ttft_ms", "TTFT ms", ".1f"),
    ("theory", "theory", ".3f"), ("fixed_cost_theory", "+fixed", ".3f"), ("measured_ratio", "measured", ".3f"),
    ("ratio_iqr", "IQR", "s"), ("ttft_ratio", "TTFT ratio", ".3f"),
)
DECODE_COLUMNS = (
    ("engine", "engine", "s"), ("l", "l", "d"), ("pool", "p", "d"), ("keys", "keys", "d"),
    ("kv_kb", "KV kB/req", ".0f"), ("step_ms", "step ms", ".2f"), ("keys_ratio", "keys ratio", ".3f"),
    ("measured_ratio", "step ratio", ".3f"), ("ratio_iqr", "IQR", "s"),
)


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        spread = row["spread"]["measured_ratio"]
        out.append({**row, "kv_kb": row["kv_bytes"] / 1e3, "ratio_iqr": f"{spread['q1']:.3f}-{spread['q3']:.3f}"})
    return out


def summary_lines(report: dict) -> list[str]:
    lines = []
    for item in report["agreement"]:
        parts = [f"{name} {v['mean_error']:+.3f} mean, {v['max_abs_error']:.3f} max |error|"
                 for name, v in ((n, item.get(n)) for n in ("theory", "fixed_cost_theory")) if v]
        lines.append(f"{item['engine']} {item['state']}: measured - " + "; measured - ".join(parts))
    for fit in report["prefill_fit"]:
        lines.append(f"{fit['engine']} {fit['state']}: prefill ≈ {fit['fixed_ms']:.1f} ms + "
                     f"{fit['per_position_ms']:.3f} ms x positions computed")
    for fit in report["decode_fit"]:
        lines.append(f"{fit['engine']} decode step ≈ {fit['fixed_ms']:.2f} ms + {fit['per_key_ms'] * 1000:.2f} µs "
                     f"x cached keys")
    exact = all(r["kv_bytes"] == r["expected_kv_bytes"] and r["computed_positions"] == r["expected_computed_positions"]
                for r in report["prefill"])
    lines.append(f"KV bytes and positions computed equal (L_x + ceil(l/p)) x bytes per position and "
                 f"L_x (+ ceil(l/p) when not warm) in every row: {exact}")
    return lines
