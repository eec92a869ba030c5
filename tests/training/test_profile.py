"""`sft bench --profile`: operator self times grouped into the shares of a step, exactly."""

from __future__ import annotations

from dataclasses import dataclass

from sft.training.profile import SHARES, group_profile


@dataclass
class Ev:
    name: str
    self_cpu_time_total: float  # microseconds
    cpu_parent: Ev | None = None


def test_group_profile_exact_seconds():
    data, opt, loss = Ev("sft.data", 5.0), Ev("sft.optimizer", 1.0), Ev("sft.loss", 2.0)
    events = [
        data, Ev("aten::copy_", 100.0, data),
        opt, Ev("aten::_foreach_add_", 300.0, opt), Ev("aten::mm", 50.0, opt),  # optimizer, whatever the op
        loss, Ev("aten::mm", 400.0, loss),  # the head's matmul is the loss's
        Ev("aten::mm", 1000.0), Ev("aten::addmm", 500.0),
        Ev("aten::_scaled_dot_product_flash_attention_for_cpu", 700.0),
        Ev("aten::mul", 250.0), Ev("aten::add", 0.0),
        Ev("autograd::engine::evaluate_function: MmBackward0", 20.0),
    ]
    s = group_profile(events, wall_us=4000.0)
    assert list(s) == list(SHARES)
    expected = {"matmul": 1500, "attention": 700, "elementwise": 250, "loss": 400, "optimizer": 350,
                "data": 100, "other": 20 + (4000 - 3320)}
    assert {k: round(v * 1e6) for k, v in s.items()} == expected
    assert abs(sum(s.values()) - 4000e-6) < 1e-12  # the shares add up to the wall time
