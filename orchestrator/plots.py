"""The benchmark's plots (matplotlib, PNG) drawn from the per-configuration summary table.

latency.png, throughput.png (p50 bars with p95 markers), speedup.png, acceptance.png (rate per
configuration and by draft position), gamma_sweep.png (tok/s and acceptance vs gamma per LM drafter),
network_share.png, concurrency.png (aggregate tok/s vs concurrent sessions, per configuration), rtt.png
(tok/s p50 vs emulated RTT, one line per configuration across RTTs: drafter, gamma, mode; and the baseline),
capacity.png (goodput and p90 TPOT vs load, from orchestrator/capacity.py).
A plot whose data is absent (e.g. no gamma sweep) is skipped.
"""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _has(summary: pd.DataFrame, column: str) -> bool:
    return column in summary and summary[column].notna().any()


def _bars(ax, labels: list[str], p50, p95=None, unit: str = "") -> None:
    x = np.arange(len(labels))
    ax.bar(x, p50, width=0.6, label="p50", color="tab:blue")
    if p95 is not None:
        ax.scatter(x, p95, marker="_", s=400, color="tab:red", label="p95", zorder=3)
        ax.legend()
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_all(summary: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    labels = list(summary["config"])
    written = []

    def figure(name: str, title: str):
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.2))
        ax.set_title(title)
        written.append(out / name)
        return fig, ax

    if _has(summary, "latency_ms_per_token_p50"):
        fig, ax = figure("latency.png", "Latency per generated token")
        _bars(ax, labels, summary["latency_ms_per_token_p50"], summary["latency_ms_per_token_p95"], "ms / token")
        _save(fig, written[-1])
    if _has(summary, "throughput_tok_s_p50"):
        fig, ax = figure("throughput.png", "Throughput per request")
        _bars(ax, labels, summary["throughput_tok_s_p50"], summary["throughput_tok_s_p95"], "tokens / s")
        _save(fig, written[-1])
    if _has(summary, "speedup_paired_p50"):
        fig, ax = figure("speedup.png", "Speedup vs verifier-only (median of per-prompt ratios)")
        _bars(ax, labels, summary["speedup_paired_p50"].fillna(0), unit="× verifier-only")
        ax.axhline(1.0, color="black", linewidth=0.8)
        _save(fig, written[-1])
    if _has(summary, "acceptance_rate"):
        spec = summary[summary["acceptance_rate"].notna()]
        fig, (ax, ax_pos) = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(spec) + 6), 4.2))
        ax.set_title("Acceptance rate (accepted / proposed)")
        _bars(ax, list(spec["config"]), spec["acceptance_rate"], unit="acceptance rate")
        ax.set_ylim(0, 1)
        ax_pos.set_title("Acceptance by draft position")
        for _, row in spec.iterrows():
            by_pos = row.get("acceptance_by_position")
            if isinstance(by_pos, list) and by_pos:
                ax_pos.plot(range(1, len(by_pos) + 1), by_pos, marker="o", label=row["config"])
        ax_pos.set_xlabel("position in the draft block")
        ax_pos.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax_pos.set_ylabel("P(accepted | proposed)")
        ax_pos.set_ylim(0, 1)
        ax_pos.legend(fontsize=7)
        ax_pos.grid(alpha=0.3)
        written.append(out / "acceptance.png")
        _save(fig, written[-1])
    sweeps = summary[summary["drafter"] == "lm"] if "drafter" in summary else summary.iloc[0:0]
    sweeps = sweeps[sweeps["gamma"].map(lambda g: isinstance(g, (int, float)) and not math.isnan(g))]
    sweeps = sweeps[sweeps["rtt_configured_ms"] == 0] if "rtt_configured_ms" in sweeps else sweeps
    sweeps = sweeps[sweeps["mode"] == "lockstep"] if "mode" in sweeps else sweeps
    if not sweeps.empty and sweeps.groupby("draft_name")["gamma"].nunique().max() >= 2 and _has(sweeps, "acceptance_rate"):
        fig, ax = figure("gamma_sweep.png", "Gamma sweep (LM drafters, lock-step, no emulated RTT)")
        ax_acc = ax.twinx()
        for name, g in sweeps.groupby("draft_name"):
            g = g.sort_values("gamma")
            ax.plot(g["gamma"], g["throughput_tok_s_p50"], marker="o", label=f"{name}: tok/s p50")
            ax_acc.plot(g["gamma"], g["acceptance_rate"], marker="s", linestyle="--", label=f"{name}: acceptance")
        ax.set_xlabel("gamma (draft tokens per block)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("tokens / s (p50)")
        ax.set_ylim(bottom=0)
        ax_acc.set_ylabel("acceptance rate")
        ax_acc.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()
        lines_acc = ax_acc.get_legend_handles_labels()
        ax.legend(lines[0] + lines_acc[0], lines[1] + lines_acc[1], fontsize=8)
        ax.grid(alpha=0.3)
        _save(fig, written[-1])
    if _has(summary, "sessions") and summary["sessions"].nunique() >= 2 and _has(summary, "aggregate_tok_s"):
        fig, ax = figure("concurrency.png", "Aggregate throughput vs concurrent sessions (one verifier)")
        series = summary["config"].str.replace(r" x\d+$", "", regex=True)  # the configuration without its level
        for name, g in summary.groupby(series, sort=False):
            g = g.sort_values("sessions")
            ax.plot(g["sessions"], g["aggregate_tok_s"], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("aggregate tokens / s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        _save(fig, written[-1])
    if _has(summary, "rtt_configured_ms") and summary["rtt_configured_ms"].nunique() >= 2 and _has(summary, "throughput_tok_s_p50"):
        fig, ax = plt.subplots(figsize=(9, 5))
        ax.set_title("Throughput per request vs emulated round trip")
        levels = summary["sessions"].nunique() > 1

        def series(row) -> str:  # one line per configuration across RTTs: drafter, gamma, mode (and level)
            name = "baseline (Generate)" if row["drafter"] == "baseline" else f"{row['draft_name']} g={row['gamma']} {row['mode']}"
            return name + (f" x{row['sessions']}" if levels else "")

        for name, g in summary.groupby(summary.apply(series, axis=1), sort=False):
            g = g.sort_values("rtt_configured_ms")
            style = {"color": "black", "linestyle": "--"} if g["drafter"].iloc[0] == "baseline" else {}
            ax.plot(g["rtt_configured_ms"], g["throughput_tok_s_p50"], marker="o", label=name, **style)
        ax.set_xlabel("emulated round trip (ms)")
        ax.set_ylabel("tokens / s (p50)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        written.append(out / "rtt.png")
        _save(fig, written[-1])
    if _has(summary, "network_share_p50"):
        net = summary[summary["network_share_p50"].notna()]
        fig, ax = figure("network_share.png", "Network share of wall time (round trip − verifier service)")
        _bars(ax, list(net["config"]), 100 * net["network_share_p50"], unit="% of wall time (p50)")
        _save(fig, written[-1])
    return written


def capacity_plot(table: pd.DataFrame, slo_tpot_ms: float | None, unit: str, path: pathlib.Path) -> None:
    """Goodput and p90 TPOT against the load (arrival rate or sessions), one line per configuration, the
    TPOT target drawn in (orchestrator/capacity.py)."""
    fig, (ax_good, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    for series, g in table.groupby("series", sort=False):
        g = g.sort_values("load")
        style = {"color": "black", "linestyle": "--"} if g["drafter"].iloc[0] == "baseline" else {}
        ax_good.plot(g["load"], g["request_goodput"], marker="o", label=series, **style)
        ax_tpot.plot(g["load"], g["p90_tpot_ms"], marker="o", label=series, **style)
    if unit == "req/s":  # goodput cannot exceed the arrival rate
        top = table["load"].max()
        ax_good.plot([0, top], [0, top], color="grey", linewidth=0.6, label="every arrival served")
    ax_good.set_title("Goodput (requests/s meeting the SLO)")
    ax_good.set_ylabel("goodput (req/s)")
    ax_tpot.set_title("TPOT p90")
    ax_tpot.set_ylabel("ms per output token")
    if slo_tpot_ms:
        ax_tpot.axhline(slo_tpot_ms, color="tab:red", linewidth=1, label=f"SLO {slo_tpot_ms:g} ms")
    for ax in (ax_good, ax_tpot):
        ax.set_xlabel("arrival rate (req/s)" if unit == "req/s" else "concurrent sessions")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
