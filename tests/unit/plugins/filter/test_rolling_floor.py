"""The rollout's batches and its capacity floor (plugins/filter/ollama_plan.py ollama_rolling_batches and
ollama_rolling_floor_errors): playbooks/rolling.yml refuses, before any change, a batch that would take more than
herd_rolling_max_pool_share % of a model's slots out at once (the multihost scenario runs the refusal for real)."""

import pytest

HOSTS = [f"gpu{i}" for i in range(1, 9)]


def plan(*instances):
    """ollama_instances of one host: (models, num_parallel) per instance."""
    return {"ollama_instances": [{"id": n, "models": models, "num_parallel": slots}
                                 for n, (models, slots) in enumerate(instances)]}


# 8 hosts of 2 instances: llama on both instances of every host (32 slots), qwen only on gpu1 (4 slots).
HOSTVARS = {h: plan((["llama3.2"], 2), (["llama3.2:latest"] + (["qwen3:8b"] if h == "gpu1" else []), 2))
            for h in HOSTS}


@pytest.mark.parametrize(("serial", "batches"), [
    (1, [[h] for h in HOSTS]),
    ("25%", [HOSTS[0:2], HOSTS[2:4], HOSTS[4:6], HOSTS[6:8]]),
    ("30%", [HOSTS[0:2], HOSTS[2:4], HOSTS[4:6], HOSTS[6:8]]),  # 2.4 hosts: rounded down
    (["1", "50%"], [HOSTS[0:1], HOSTS[1:5], HOSTS[5:8]]),
    ("1%", [[h] for h in HOSTS]),  # at least one host
    (3, [HOSTS[0:3], HOSTS[3:6], HOSTS[6:8]]),
])
def test_batches_are_ansibles_serial(planner, serial, batches):
    assert planner.ollama_rolling_batches(HOSTS, serial) == batches


@pytest.mark.parametrize("serial", ["x", "0", [], -1])
def test_a_bad_serial_names_the_variable(planner, serial):
    with pytest.raises(planner.AnsibleFilterError, match="herd_rolling_serial"):
        planner.ollama_rolling_batches(HOSTS, serial)


def test_one_host_at_a_time_is_never_refused(planner):
    # qwen lives on gpu1 alone: rolling gpu1 takes all of it out, which no batch size avoids.
    assert planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, serial=1, max_share=10) == []


def test_batches_of_a_quarter_keep_three_quarters(planner):
    assert planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, serial="25%", max_share=25) == []
    errors = planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, serial="50%", max_share=25)
    # 4 hosts of 8 = 16 of llama's 32 slots, in each of the two batches; qwen's one host is its one unit.
    assert len(errors) == 2, errors
    assert "batch 1 (gpu1, gpu2, gpu3, gpu4) would take 16 of the 32 slots of model llama3.2:latest" in errors[0]
    assert "(50%), above herd_rolling_max_pool_share=25%" in errors[0] and "Fix: a smaller herd_rolling_serial" in errors[0]


def test_by_instance_takes_one_instance_per_host(planner):
    # By instance, a batch of 4 hosts has 4 instances out at a time: 8 of llama's 32 slots (25%).
    assert planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, serial="50%", max_share=25, by_instance=True) == []
    assert planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, serial="100%", max_share=25, by_instance=True)


@pytest.mark.parametrize("share", [0, 101, "half", None])
def test_a_bad_share_names_the_variable(planner, share):
    (error,) = planner.ollama_rolling_floor_errors(HOSTS, HOSTVARS, max_share=share)
    assert error.startswith("herd_rolling_max_pool_share=") and "Fix:" in error
