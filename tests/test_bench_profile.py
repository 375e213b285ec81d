"""The bench's profile summary: a step's time is the stacks that pass through it."""

from bench.profile import summarise

ROOT = "run (uvicorn/main.py:1);_chat (node/ingress/openai.py:1)"
RAW = "\n".join(
    [
        f"{ROOT};complete (node/gateway/pipeline.py:1);_route (node/gateway/pipeline.py:2) 6",
        f"{ROOT};complete (node/gateway/pipeline.py:1);Accounting.finish (a.py:3) 3",
        f"{ROOT};complete (node/gateway/pipeline.py:4) 1",
    ]
)


def test_a_step_less_a_nested_one_counts_only_its_own_stacks() -> None:
    steps = summarise(RAW, cpu_us_per_request=100.0)["by_step"]
    assert isinstance(steps, dict)
    by_label = {
        label.strip().split(":")[0]: value["us_per_request"] for label, value in steps.items()
    }
    assert by_label["route"] == 60.0
    assert by_label["answer"] == 40.0  # complete's 100, less the route's 60
    assert by_label["finish"] == 30.0
