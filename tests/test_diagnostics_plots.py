import json

import torch

from rlvr_entropy import diagnostics as D
from rlvr_entropy import diagnostics_plots as P


def _records(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 50, 6, generator=g, dtype=torch.float64)
    a = torch.randint(6, (1, 50), generator=g)
    adv = torch.randn(1, 50, generator=g, dtype=torch.float64)
    probe = D.EntropyChangeProbe()
    probe.before(z, a, adv, torch.ones(1, 50, dtype=torch.bool), adv)
    rec = probe.after(z + 0.01 * torch.randn(z.shape, generator=g, dtype=torch.float64))
    path = tmp_path / "entropy_change.jsonl"
    path.write_text(json.dumps(rec.to_json()) + "\n")
    return P.load_probe_records(path)


def test_plots_write_pngs(tmp_path):
    recs = _records(tmp_path)
    assert len(recs) == 1 and "exact/pearson" in recs[0]["report"]
    for f in (P.scatter_predicted_vs_measured(recs, tmp_path / "a.png"), P.quadrant_bars(recs, tmp_path / "b.png"),
              P.entropy_percentiles([{"step": i, "entropy/p50": 1.0 / (i + 1), "entropy/p90": 2.0} for i in range(5)],
                                    tmp_path / "c.png")):
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert P.load_probe_records(tmp_path / "missing.jsonl") == []


def test_percentiles_by_method_name_each_panel_and_use_a_log_scale(tmp_path, monkeypatch):
    seen = []
    real = P._save

    def spy(plt, fig, out):
        seen.extend((ax.get_title(), ax.get_yscale()) for ax in fig.axes if ax.axison)
        return real(plt, fig, out)

    monkeypatch.setattr(P, "_save", spy)
    rows = [{"step": i, "entropy/p50": 0.0, "entropy/p90": 0.5 / (i + 1), "entropy/p99": 1.0, "entropy": 0.2}
            for i in range(1, 6)]
    P.entropy_percentiles_by_method({"grpo": rows, "siren": rows, "steer": rows}, tmp_path / "p.png")
    assert seen == [("grpo", "log"), ("siren", "log"), ("steer", "log")]
