"""DIR/report.md: every experiment's figure and a "measured vs theory" table."""
from __future__ import annotations

import math


ETF_OF = {K: math.sqrt(2 - 2 * math.sqrt((K - 1) / K)) for K in range(2, 101)}


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:.3e}" if (abs(x) < 1e-3 or abs(x) >= 1e4) and x != 0 else f"{x:.6g}"


def _fmt_objective(x) -> str:
    return "—" if x is None else f"{x:.10g}"


def ufm_section(summary: dict, rel_dir: str) -> str:
    """Markdown for one UFM experiment: figure link and the comparison table."""
    th = summary.get("theory") or {}
    frame = summary["expected_frame"]
    other = "etf" if frame == "of" else "of"
    K = summary["K"]
    relu = "relu" in summary["model"]
    lines = [f"## {summary['name']}: {summary['title']}", "",
             f"Model: {summary['model']}. {summary['iterations']} GD iterations in {summary['seconds']:.1f} s"
             + (f", best of {len(summary['restart_objectives'])} restarts "
                f"(final objectives {', '.join(f'{v:.8g}' for v in summary['restart_objectives'])})"
                if len(summary["restart_objectives"]) > 1 else "") + ".", "",
             f"**Verdict: {summary['verdict_line']}.**"
             + (" Restarts: " + "; ".join(f"{i}: {line}" for i, line in enumerate(summary["restart_verdicts"]))
                + "." if len(summary["restart_verdicts"]) > 1 else ""), "",
             f"![{summary['name']}]({rel_dir}/figure.png)  ", f"[pdf]({rel_dir}/figure.pdf) · "
             f"[column width]({rel_dir}/figure-column.pdf) · [caption]({rel_dir}/caption.md) · "
             f"[restarts.csv]({rel_dir}/restarts.csv) · "
             f"[metrics.csv]({rel_dir}/metrics.csv) · [summary.json]({rel_dir}/summary.json) · "
             f"[config.toml]({rel_dir}/config.toml)", "",
             "| quantity | measured | theory |", "|---|---|---|",
             f"| final objective | {_fmt_objective(summary['objective'])} | "
             f"{_fmt_objective(summary['objective_optimal'])} |",
             f"| gap f − f* (relative) | {_fmt(summary['gap'])} ({_fmt(summary['relative_gap'])}) | "
             f"{'—' if summary['objective_optimal'] is None else '0'} |",
             f"| verdict | {summary['verdict']} | "
             f"{'optimal' if summary['objective_optimal'] is not None else 'stationary (no exact f*)'} |"]
    if summary.get("stationary_value") is not None and summary["verdict"] == "stationary":
        lines.append(f"| objective of the stationary point GD found | {_fmt_objective(summary['objective'])} | "
                     f"{_fmt_objective(summary['stationary_value'])} |")
    zero_opt = th.get("collapsed_to_zero", False)
    for level, m in summary["levels"].items():
        no_structure = relu and level == "H1"
        expect_zero = "not predicted (the ReLU model's H1 geometry is not unique)" if no_structure else "0"
        if summary["objective_optimal"] == 0.0 and not th:
            expect_zero = "no prediction (λ = 0: no collapse forced)"
        if zero_opt:
            expect_zero = "undefined (optimum is H = 0)"
        other_value = "0 (an OF centred is an ETF)" if frame == "of" else f"{ETF_OF.get(K, float('nan')):.4f}"
        nc1_expect = "0" if no_structure else expect_zero  # NC1 holds at every level (docs/theory.md §3.4)
        lines += [f"| {level} NC1 | {_fmt(m['nc1'])} | {nc1_expect} |",
                  f"| {level} NC2 to {frame.upper()} | {_fmt(m[f'nc2_{frame}'])} | {expect_zero} |",
                  f"| {level} NC2 to {other.upper()} | {_fmt(m[f'nc2_{other}'])} | "
                  f"{expect_zero if no_structure or zero_opt or expect_zero.startswith('no') else other_value} |",
                  f"| {level} NC3 ({frame.upper()}) | {_fmt(m['nc3'])} | {expect_zero} |"]
        predicted = (th.get("mean_sq_norms") or {}).get(level)
        if predicted is not None:
            lines.append(f"| {level} mean ‖μ_k‖² | {_fmt(m['mean_sq_norm'])} | {_fmt(predicted)} |")
    for name, value in (th.get("factor_sq_norms") or {}).items():
        lines.append(f"| ‖{name}‖²_F | {_fmt(summary['factor_sq_norms'][name])} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"
