"""The benchmarks' own models: what they time must be what they say."""

def test_the_pipeline_profile_finds_where_the_actors_waited():
    """bench/pipeline.py's reading of Ray's timeline: over the loop's iterations after the first collection, an
    actor's time with no call running, shared out among the loop phases it fell in."""
    from bench.pipeline import actors_idle

    def call(actor: str, start: float, end: float, name: str = "hand_over") -> dict:
        return {"cat": f"task::RolloutWorker.{name}", "name": name, "tid": actor, "ts": start * 1e6,
                "dur": (end - start) * 1e6}

    spans = [("collect", 0.0, 10.0), ("update", 10.0, 18.0), ("publish", 18.0, 19.0), ("gate", 19.0, 20.0),
             ("collect", 20.5, 30.0), ("update", 30.0, 50.0)]  # the last update: nothing in flight, not counted
    events = [call("a", 0.0, 1.0, "__init__"),  # starting up is not a call of the loop's
              call("a", 1.0, 18.5), call("a", 19.0, 20.0), call("a", 20.5, 30.0),  # waited 0.5 in publish, 0.5 between
              call("b", 1.0, 19.0), call("b", 19.0, 19.5), call("b", 20.5, 40.0),  # 0.5 in gate, 0.5 between
              call("b", 45.0, 46.0)]  # after the last collection: outside the window
    got = actors_idle(events, spans)
    assert got["actors"] == 2 and got["seconds"] == 20.0
    assert abs(got["actors_wait"] - 2.0 / 40.0) < 1e-9
    assert {k: round(v * 40, 6) for k, v in got["idle_by_phase"].items()} == {"publish": 0.5, "gate": 0.5,
                                                                              "between phases": 1.0}


def test_learning_speed_leaves_its_own_evaluations_off_the_clock_and_finds_when_failures_halved(tmp_path):
    """bench/learning_speed.py's curve: minutes from the command's start less the seconds of the benchmark's mid-run
    evaluations up to each point (not the job's own, at the start and the end); the first point at or above the halved failure rate, on either axis; the share
    of the ground-truth gain taken at as many env steps."""
    import json

    from bench.learning_speed import DEFAULT, TRUTH, at, curve, first_reaching, judge, summarise

    def run(name, points):  # (seconds after the start, env steps, success); each evaluation took 30 s
        (tmp_path / name).mkdir()
        rows = [{"step": i, "time": 1000.0 + t, "env_steps": steps} for i, (t, steps, _) in enumerate(points)]
        rows += [{"step": i, "time": 1000.0 + t + 30, "eval/success": ok, "eval/version": i, "eval/ci95_low": 0.0,
                  "eval/ci95_high": 1.0, "time/evaluate": 30.0} for i, (t, _, ok) in enumerate(points)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in sorted(
            rows, key=lambda r: r["time"])))
        got = curve(tmp_path / name, started=1000.0)
        return summarise(name, [], {"final_success": got[-1]["success"], "final_ci95": [0, 1], "env_steps": 0,
                                    "iterations": 3, "wall_seconds": 0}, got)

    fast = run(DEFAULT, [(0, 0, 0.5), (300, 50_000, 0.7), (600, 90_000, 0.76), (870, 120_000, 0.8)])
    # each point 30 s after its iteration; the two mid-run evaluations' 30 s each off the clock
    assert [round(p["minutes"], 3) for p in fast["curve"]] == [0.5, 5.0, 9.5, 14.0]
    assert fast["halved_at"] == 0.75 and fast["minutes_to_halve"] == 9.5 and fast["steps_to_halve"] == 90_000
    assert first_reaching(fast["curve"], 0.9, "minutes") is None and at(fast["curve"], "env_steps", 100_000)[
        "success"] == 0.76
    truth = run(f"{TRUTH}-ground_truth", [(0, 0, 0.5), (300, 100_000, 0.8), (600, 130_000, 0.9)])
    verdict = judge({DEFAULT: fast, f"{TRUTH}-ground_truth": truth})
    assert verdict["detector_share_of_ground_truth_gain"] == (0.8 - 0.5) / (0.8 - 0.5)  # truth at 100k <= 120k steps
    assert verdict["met"] is True and verdict["steps_to_halve"] == 90_000
