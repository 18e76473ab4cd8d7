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
