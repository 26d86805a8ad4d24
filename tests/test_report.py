"""report.py on a long log: the sampled reading gives the figures a full parse of every line gives."""
import json
import statistics

import report


def test_a_long_log_with_a_torn_last_line_reads_as_every_line_parsed(tmp_path):
    records = []
    for step in range(5000):
        if step % 50 == 0:
            records.append(dict(step=step, val_loss=3 - step / 1e4, val_bpb=1.0, tokens=step,
                                flops=6.0 * step, elapsed=step / 10))
        elif step == 777:
            records.append(dict(step=step, skipped=True, train_loss=None, tokens=step,
                                flops=6.0 * step, elapsed=step / 10))
        else:
            records.append(dict(step=step, train_loss=4 - step / 1e4, lr=1e-3, tokens=step,
                                flops=6.0 * step, elapsed=step / 10, tok_per_sec=1e3 + step % 13,
                                mfu=1.5e-05 * (step % 3) if step % 2 else None))
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "log.jsonl").write_text(text + '{"step": 5000, "train_lo')  # killed mid-line
    summary = report.summarize(report.read_for_report(tmp_path))
    trains = [r for r in records if r.get("train_loss") is not None]
    assert summary["median_tok_per_sec"] == statistics.median(r["tok_per_sec"] for r in trains)
    assert summary["median_mfu"] == statistics.median(
        r["mfu"] for r in trains if r["mfu"] is not None)
    assert summary["train_loss"] == trains[-1]["train_loss"] and summary["skipped"] == 1
    assert summary["steps"] == 4999 and summary["evaluations"] == 100
    assert summary["best"]["step"] == 4950 and summary["final"] == records[4950]
    assert len(report.read_for_report(tmp_path)["trains"]) <= report.PLOT_POINTS
