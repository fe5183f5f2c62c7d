"""`distill report RUN`: one self-contained HTML page and a markdown summary of a training run.

Reads from the run directory (local or s3://):

- metrics.jsonl: one JSON object per optimizer step (step, epoch, loss, kl, ce,
  kl_weight, lr, grad_norm, examples_per_s, tokens_per_s, mem_mb);
- eval.json: `evaluate()` of the final model, plus "per_epoch": the `evaluate()` dict of
  every epoch with its "epoch";
- config.yaml (optional): shown at the end of the page.

Either of the first two may be missing (a run still training has no eval.json yet), not
both; a figure or table whose numbers are absent (an older eval.json without the
choice-point accuracy, margins, baselines or samples) is left out. Writes report.html
(plots as inline base64 PNGs, drawn with matplotlib's Agg renderer through `Figure`,
without pyplot's global state) and summary.md next to them. Both show the final figures,
the student's exact agreement with the teacher beside the baselines' (majority answer,
bag of words) for all comments and per teacher-margin bucket, and a few held-out
comments with the teacher's and the student's answers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from distill import storage


class ReportError(ValueError):
    """A run directory with nothing to report; one line."""


def _read_optional(run_dir: str, name: str) -> bytes | None:
    uri = storage.join(run_dir, name)
    return storage.read_bytes(uri) if storage.exists(uri) else None


def _read_metrics(run_dir: str) -> list[dict]:
    data = _read_optional(run_dir, "metrics.jsonl")
    if data is None:
        return []
    metrics = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{storage.join(run_dir, 'metrics.jsonl')}: line {number} is not JSON ({e})") from None
    return metrics


# -----------------------------------------------------------------------------
# Figures


def _series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    """(xs, ys) of the records that have a number for both."""
    pairs = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _lines(records: list[dict], x: str, keys: list[str], title: str, ylim=None) -> str | None:
    """Line plot of records[key] against records[x] for each key that has numbers; None if none does."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    drawn = 0
    for key in keys:
        xs, ys = _series(records, x, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=key)
            drawn += 1
    if not drawn:
        return None
    ax.set(title=title, xlabel=x)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs
    if ylim:
        ax.set_ylim(ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _schedule(metrics: list[dict]) -> str | None:
    """KL weight (left axis) and learning rate (right axis) over steps."""
    steps_w, weights = _series(metrics, "step", "kl_weight")
    steps_lr, lrs = _series(metrics, "step", "lr")
    if not steps_w and not steps_lr:
        return None
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    ax.plot(steps_w, weights, color="tab:blue", label="kl_weight")
    ax.set(title="KL weight and learning rate", xlabel="step", ylim=(0, 1.05))
    ax.set_ylabel("kl_weight", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(steps_lr, lrs, color="tab:orange", label="lr")
    lr_ax.set_ylabel("lr", color="tab:orange")
    ax.grid(alpha=0.3)
    return _png(fig)


def _confusion(confusion: dict) -> str | None:
    """One heat map per field: rows the teacher's value, columns the student's, counts written in."""
    if not confusion:
        return None
    fig = Figure(figsize=(3.6 * len(confusion), 3.6))
    for i, (field, c) in enumerate(confusion.items()):
        ax = fig.add_subplot(1, len(confusion), i + 1)
        labels, matrix = c["labels"], c["matrix"]
        ax.imshow(matrix, cmap="Blues")
        top = max(max(row) for row in matrix) or 1
        for t, row in enumerate(matrix):
            for s, count in enumerate(row):
                ax.text(s, t, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set(title=field, xlabel="student")
        if i == 0:
            ax.set_ylabel("teacher")
    fig.tight_layout()
    return _png(fig)


def _agreement(final: dict) -> str | None:
    """Bars: the student's agreement with the teacher per field, then teacher and student against humans."""
    bars = [(f"{field}\nstudent\n= teacher", share, "tab:blue")
            for field, share in final.get("field_agreement", {}).items()]
    human = final.get("human") or {}
    if human.get("n"):
        bars += [(f"{human['field']}\nteacher\n= human", human["teacher_agreement"], "tab:green"),
                 (f"{human['field']}\nstudent\n= human", human["student_agreement"], "tab:orange")]
    if not bars:
        return None
    fig = Figure(figsize=(max(6, 1.4 * len(bars)), 3.4))
    ax = fig.add_subplot()
    names, shares, colors = zip(*bars)
    ax.bar(range(len(bars)), shares, color=colors)
    for i, share in enumerate(shares):
        ax.text(i, share + 0.02, f"{share:.1%}", ha="center")
    ax.set_xticks(range(len(bars)), names, fontsize=8)
    title = "agreement" + (f" (human labels on {human['n']} comments)" if human.get("n") else "")
    ax.set(title=title, ylim=(0, 1.12))
    return _png(fig)


# -----------------------------------------------------------------------------
# Figures in words


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def _percent(x) -> str:
    return _fmt(x, ".1%")


def summary_rows(metrics: list[dict], final: dict) -> list[tuple[str, str]]:
    """(name, value) of the final figures, shared by summary.md and the HTML page."""
    rows = []
    if final.get("n"):
        rows += [
            ("held-out comments", f"{final['n']:,}"),
            ("teacher-forced accuracy, all positions (inflated: mostly forced JSON tokens)",
             _percent(final.get("teacher_forced_acc"))),
        ]
        if "choice_point_acc" in final:
            rows.append((f"choice-point accuracy (teacher-forced, constrained; {final['n_choice_points']:,} choices)",
                         _percent(final["choice_point_acc"])))
        rows.append(("student-only exact answers (constrained)", _percent(final.get("student_only_exact"))))
        if "student_only_exact_margin_ge_0.2" in final:
            confident = final["agreement_by_margin"][">=0.2"]["n"]
            rows.append((f"student-only exact where the teacher's margin >= 0.2 ({confident:,} comments)",
                         _percent(final["student_only_exact_margin_ge_0.2"])))
        base = final.get("baselines")
        if base:
            majority = "/".join(base["majority"].values())
            rows += [(f"majority-answer baseline ({majority}), exact", _percent(base["majority_answer"])),
                     ("bag-of-words baseline (TF-IDF + logistic regression), exact", _percent(base["bag_of_words"]))]
        rows += [
            ("valid answers, unconstrained", _percent(final.get("json_valid_unconstrained"))),
            ("held-out forward KL per token", _fmt(final.get("held_out_kl"), ".4f")),
        ]
        rows += [(f"{field} agreement with the teacher", _percent(share))
                 for field, share in final.get("field_agreement", {}).items()]
        human = final.get("human")
        if human:
            rows += [(f"human {human['field']} labels used", f"{human['n']:,}"),
                     (f"teacher agreement with human {human['field']}", _percent(human["teacher_agreement"])),
                     (f"student agreement with human {human['field']}", _percent(human["student_agreement"]))]
    if metrics:
        last = metrics[-1]
        rows += [("optimizer steps", f"{last.get('step', len(metrics)):,}"),
                 ("last epoch", str(last.get("epoch", "-")))]
        for key, name in [("loss", "final loss"), ("kl", "final KL"), ("ce", "final CE")]:
            if isinstance(last.get(key), (int, float)):
                rows.append((name, f"{last[key]:.4f}"))
        for key, name, fmt in [("examples_per_s", "examples/s (median)", "{:,.1f}"),
                               ("tokens_per_s", "tokens/s (median)", "{:,.0f}")]:
            _, values = _series(metrics, "step", key)
            if values:
                rows.append((name, fmt.format(statistics.median(values))))
        _, memory = _series(metrics, "step", "mem_mb")
        if memory:
            rows.append(("peak memory", f"{max(memory):,.0f} MB"))
    return rows


PREDICTORS = [("student", "student"), ("majority answer", "majority_answer"), ("bag of words", "bag_of_words")]
"""(column title, key) of what agrees with the teacher, in eval.json's agreement_by_margin."""


def baseline_table(final: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]] | None:
    """(head, rows): exact agreement with the teacher of the student and each baseline present,
    all comments and per teacher-margin bucket; None for an eval without margins."""
    by_margin = final.get("agreement_by_margin")
    if not by_margin:
        return None
    base = final.get("baselines") or {}
    columns = [(title, key) for title, key in PREDICTORS if key == "student" or key in base]
    overall = {"student": final.get("student_only_exact"), **base}
    rows = [("all", f"{final['n']:,}", *(_percent(overall[key]) for _, key in columns))]
    rows += [(f"teacher margin {label}", f"{b['n']:,}", *(_percent(b.get(key)) for _, key in columns))
             for label, b in by_margin.items()]
    return ("comments", "n", *(title for title, _ in columns)), rows


def sample_table(final: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]] | None:
    """(head, rows): a few held-out comments, the teacher's and the student's answers; None without samples."""
    samples = final.get("samples")
    if not samples:
        return None
    rows = [(" ".join(s["text"].split()), "/".join(s["teacher"].values()), "/".join(s["student"].values()),
             "yes" if s["student"] == s["teacher"] else "no", _fmt(s["margin"], ".2f")) for s in samples]
    return ("comment", "teacher", "student", "same", "teacher margin"), rows


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")  # a | would end the cell


def _markdown(title: str, rows: list[tuple[str, str]],
              tables: list[tuple[str, tuple[tuple[str, ...], list[tuple[str, ...]]]]] = ()) -> str:
    """The figures as a two-column table, then each (heading, (head, rows)) table."""
    lines = [f"# {title}", "", "| figure | value |", "|---|---:|"]
    lines += [f"| {_md_cell(name)} | {value} |" for name, value in rows]
    for heading, (head, body) in tables:
        lines += ["", f"## {heading}", "", "| " + " | ".join(head) + " |",
                  "|---|" + "---:|" * (len(head) - 1)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...] | None = None) -> str:
    cells = ([("th", head)] if head else []) + [("td", row) for row in rows]
    return "<table>" + "".join("<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row) + "</tr>"
                               for tag, row in cells) + "</table>"


def _per_epoch_rows(per_epoch: list[dict]) -> list[tuple[str, ...]]:
    return [(str(e.get("epoch", "-")), _percent(e.get("teacher_forced_acc")), _percent(e.get("choice_point_acc")),
             _percent(e.get("student_only_exact")), _percent(e.get("json_valid_unconstrained")),
             _fmt(e.get("held_out_kl"), ".4f")) for e in per_epoch]


def _img(png: str | None) -> str:
    return f'<img src="data:image/png;base64,{png}">' if png else ""


STYLE = """body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
td:not(:first-child) { text-align: right; }
img { display: block; margin: 1em 0; max-width: 100%; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }"""


def write_report(run_dir: str) -> tuple[str, str]:
    """Write report.html and summary.md into `run_dir`; returns their URIs."""
    metrics = _read_metrics(run_dir)
    eval_bytes = _read_optional(run_dir, "eval.json")
    if not metrics and eval_bytes is None:
        raise ReportError(f"{run_dir}: neither metrics.jsonl nor eval.json, nothing to report")
    final = json.loads(eval_bytes) if eval_bytes is not None else {}
    per_epoch = final.get("per_epoch", [])
    config = _read_optional(run_dir, "config.yaml")

    title = f"distill report: {run_dir.rstrip('/').rsplit('/', 1)[-1]}"
    rows = summary_rows(metrics, final)
    tables = [(heading, table) for heading, table in
              (("Student beside baselines: exact answer = teacher's (held out)", baseline_table(final)),
               ("Teacher and student on a few held-out comments", sample_table(final))) if table]
    sections = [
        ("Final figures", [_table(rows)] if rows else []),
        *((heading, [_table(body, head)]) for heading, (head, body) in tables),
        ("Training", [
            _img(_lines(metrics, "step", ["loss"], "loss")),
            _img(_lines(metrics, "step", ["kl", "ce"], "KL and CE terms")),
            _img(_schedule(metrics)),
        ]),
        ("Per epoch (held out)", [
            _img(_lines(per_epoch, "epoch", ["teacher_forced_acc", "choice_point_acc", "student_only_exact",
                                             "json_valid_unconstrained"], "accuracy per epoch", ylim=(0, 1.05))),
            _table(_per_epoch_rows(per_epoch), ("epoch", "teacher-forced", "choice points", "student-only",
                                                "valid unconstrained", "held-out KL")) if per_epoch else "",
        ]),
        ("Student against teacher and humans (final model)", [
            _img(_confusion(final.get("confusion"))),
            _img(_agreement(final)),
        ]),
        ("Config", [f"<pre>{html.escape(config.decode())}</pre>"] if config is not None else []),
    ]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><p>{html.escape(run_dir)}</p>"]
    for heading, fragments in sections:
        if any(fragments):
            page += [f"<h2>{heading}</h2>", *filter(None, fragments)]
    page.append("</body></html>")

    html_uri, md_uri = storage.join(run_dir, "report.html"), storage.join(run_dir, "summary.md")
    storage.write_bytes(html_uri, "\n".join(page).encode())
    storage.write_bytes(md_uri, _markdown(title, rows, tables).encode())
    return html_uri, md_uri
