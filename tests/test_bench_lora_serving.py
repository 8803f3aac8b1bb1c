"""The serving benchmark end to end on a tiny model: its trace, every policy finishing it, its JSON."""

import json

from bench.lora_serve import main, make_trace


def test_the_trace_keeps_its_requests_when_a_share_of_answers_is_long():
    short = make_trace(200, 8, 4.0, 1.5, 32, seed=3, max_tokens=8)
    mixed = make_trace(200, 8, 4.0, 1.5, 32, seed=3, max_tokens=8, long_share=0.25, long_tokens=40)
    assert [q[:3] for q in short] == [q[:3] for q in mixed]  # same arrivals, adapters and prompts
    assert {q[3] for q in short} == {8}
    n_long = sum(q[3] == 40 for q in mixed)
    assert 30 <= n_long <= 70 and n_long + sum(q[3] == 8 for q in mixed) == 200
    assert [q[1] for q in short].count("lora-0") > [q[1] for q in short].count("lora-7")  # Zipf-skewed


def test_every_policy_serves_the_whole_trace(tmp_path, capsys):
    out = tmp_path / "serving.json"
    assert main(["--device", "cpu", "--layers", "1", "--adapters", "3", "--max-rank", "8", "--requests", "8",
                 "--rates", "20", "--max-tokens", "3", "--long-share", "0.25", "--long-tokens", "6",
                 "--prompt-len", "8", "--max-running", "4", "--timeout", "120", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    runs = figures["rates"]["20"]
    assert set(runs) == {"auto", "unmerged", "merged"}
    for name, r in runs.items():
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["mean_ms"] > 0 and r["steps"] > 0, name
    assert runs["unmerged"]["mode_steps"] == f"unmerged:{runs['unmerged']['steps']}"
    assert "mixture" not in runs["merged"]["mode_steps"] and "unmerged" not in runs["merged"]["mode_steps"]
    assert isinstance(figures["latency_reduction"]["20"], float)
    costs = runs["auto"]["costs"]  # calibrated at start: real forwards with and without LoRA
    assert costs["base_step_ms"] > 0 and costs["base_step_tokens"] == 3, costs  # a forward takes time
    # differences of timings: on a 1-layer model LoRA's share may measure as nothing, never below it
    assert min(costs[k] for k in ("call_ms", "segment_ms", "token_ms", "merge_ms", "merge_ms_per_rank")) >= 0, costs
    printed = capsys.readouterr().out
    assert "auto vs best baseline" in printed and "a decode step of 3 tokens" in printed
