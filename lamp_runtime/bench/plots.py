"""PNG figures for docs/benchmarks.md (matplotlib is a dev extra: `pip install -e '.[dev]'`)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install -c constraints.txt matplotlib "
                         "(it is in the dev extra)") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_pooling(report: dict, path: str | Path) -> Path:
    """One row per engine. Prefill time relative to p = 1 (median, IQR bars) per state against the
    theory (dashed), one colour per l; last column: decode step time against the cached keys."""
    plt = _pyplot()
    rows, decode = report["prefill"], report["decode"]
    kinds, states = sorted({r["engine"] for r in rows}), ("cold", "off", "warm")
    lengths, pools = sorted({r["l"] for r in rows}), sorted({r["pool"] for r in rows})
    fig, axes = plt.subplots(len(kinds), 4, figsize=(14, 3.6 * len(kinds)), squeeze=False)
    for axes_row, kind in zip(axes, kinds):
        for ax, state in zip(axes_row, states):
            for index, length in enumerate(lengths):
                mine = sorted((r for r in rows if (r["engine"], r["state"], r["l"]) == (kind, state, length)),
                              key=lambda r: r["pool"])
                medians, spread = [r["measured_ratio"] for r in mine], [r["spread"]["measured_ratio"] for r in mine]
                ax.plot([r["pool"] for r in mine], [r["theory"] for r in mine], "--", color=f"C{index}", lw=1)
                ax.errorbar([r["pool"] for r in mine], medians, capsize=3, fmt="o-", color=f"C{index}",
                            yerr=[[m - s["q1"] for m, s in zip(medians, spread)],
                                  [s["q3"] - m for m, s in zip(medians, spread)]], label=f"l={length}")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(pools, [str(p) for p in pools])
            ax.set_xlabel("pool block p")
            ax.set_title(f"{kind}: prefill, {state}", fontsize=9)
            ax.grid(alpha=0.3)
        axes_row[0].set_ylabel("prefill / p = 1's (dashed: theory)")
        axes_row[0].legend(fontsize=7)
        ax = axes_row[3]
        for index, pool in enumerate(sorted({r["pool"] for r in decode})):
            mine = sorted((r for r in decode if (r["engine"], r["pool"]) == (kind, pool)), key=lambda r: r["keys"])
            ax.plot([r["keys"] for r in mine], [r["step_ms"] for r in mine], "o-", color=f"C{index}", label=f"p={pool}")
        ax.set_xlabel("cached keys L_x + ceil(l/p)")
        ax.set_ylabel("decode step ms")
        ax.set_title(f"{kind}: decode step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_batching(report: dict, path: str | Path) -> Path:
    """Tokens per wall-clock second and per CPU second of the four serving variants (median, IQR bars)."""
    plt = _pyplot()
    variants = list(report["variants"].values())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "generated tokens / wall-clock s"),
                            (axes[1], "tokens_per_cpu_s", "generated tokens / CPU s")):
        medians = [v[key] for v in variants]
        spread = [v["spread"][key] for v in variants]
        ax.bar(range(len(variants)), medians, color=[f"C{i}" for i in range(len(variants))],
               yerr=[[m - s["q1"] for m, s in zip(medians, spread)], [s["q3"] - m for m, s in zip(medians, spread)]],
               capsize=4)
        ax.set_xticks(range(len(variants)), [v["label"].replace(", ", ",\n", 1) for v in variants], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report['config']['requests']} requests, {report['config']['new_tokens']} new tokens each")
    return _save(fig, plt, path)


def plot_speed(report: dict, path: str | Path) -> Path:
    """Decode tokens/s per backbone option and batch size (median, min..max bars) with each one's
    weight-streaming bound (hollow markers) and llama.cpp's tg (dashed line, batch 1)."""
    plt = _pyplot()
    rows = report["decode"]
    options = list(dict.fromkeys(r["option"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [next(r for r in rows if r["option"] == o and r["batch"] == batch) for o in options]
        medians = [r["tokens_per_s"] for r in mine]
        ax.bar(range(len(mine)), medians, color=[f"C{i}" for i in range(len(mine))],
               yerr=[[m - r["spread"]["min"] for m, r in zip(medians, mine)],
                     [r["spread"]["max"] - m for m, r in zip(medians, mine)]], capsize=4)
        ax.scatter(range(len(mine)), [r["bound_tokens_per_s"] for r in mine], marker="_", s=400, color="k",
                   label="bandwidth bound")
        if batch == 1 and "llama_cpp" in report:
            ax.axhline(report["llama_cpp"]["tg_tokens_per_s"]["median"], ls="--", color="gray", label="llama.cpp tg")
        ax.set_xticks(range(len(mine)), [o.replace("/", "\n") for o in options], fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("decode tokens / s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _save(fig, plt, path, layout: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_many_tasks(report: dict, path: str | Path) -> Path:
    """Prompt-KV hit ratio and TTFT p95 against the pool block p, one line per (task count, traffic)."""
    plt = _pyplot()
    rows = report["rows"]
    fig, (hits, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, key in enumerate(sorted({(r["tasks"], r["traffic"]) for r in rows})):
        mine = sorted((r for r in rows if (r["tasks"], r["traffic"]) == key), key=lambda r: r["pool"])
        pools = [r["pool"] for r in mine]
        style = "o-" if key[1] == "zipf" else "s--"
        label = f"{key[0]:,} tasks, {key[1]}"
        hits.plot(pools, [r["hit_ratio"] for r in mine], style, color=f"C{index // 2}", label=label)
        ttft.plot(pools, [r["ttft_ms"]["p95"] for r in mine], style, color=f"C{index // 2}", label=label)
    budget = report["settings"]["prompt_kv_cache_mb"]
    for ax, title in ((hits, f"prompt-KV hit ratio ({budget} MiB budget)"), (ttft, "TTFT p95 (ms)")):
        ax.set_xscale("log")
        pools = sorted({r["pool"] for r in rows})
        ax.set_xticks(pools, [str(p) for p in pools])
        ax.set_xlabel("pool block p")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ttft.set_yscale("log")
    hits.set_ylim(0, 1)
    hits.legend(fontsize=8)
    if report.get("random_weights"):
        fig.suptitle("random-weight backbone: costs, not quality", fontsize=9)
    return _save(fig, plt, path)
