"""evals.shape_trace on the shipped world model: the three judge runs, the SDEdit start sigmas in order, and the
background a real scene's latent keeps when the model only finishes its last steps."""
import os

from qwenimage_jax.evals import shape_trace, t2i
from qwenimage_jax.sampling.pipeline import QwenImagePipeline

MODEL = os.path.join(os.path.dirname(t2i.__file__), "..", "assets", "tiny_world")


def test_trace_runs_the_three_judges_in_order():
    pipe = QwenImagePipeline.from_pretrained(MODEL, transformer_subfolder="teacher/transformer")
    result = shape_trace.trace(pipe, num=4, size=t2i.model_size(MODEL), num_fit=16, skipped_steps=(0, 20, 38))
    for name in ("generated", "generated_readout"):
        assert "shape" in result[name] and result[name]["background"] == 1.0, result[name]
    # the teacher takes colour and background from the prompt (held-out test figures 0.96 / 1.0)
    assert result["generated"]["colour"] >= 0.75, result["generated"]
    starts = [row["start_sigma"] for row in result["from_real"]]
    assert starts[0] == 1.0 and starts == sorted(starts, reverse=True) and starts[-1] < 0.2
    assert [row["steps"] for row in result["from_real"]] == [40, 20, 2]
    # two steps from a real scene's latent at sigma < 0.2 keep its plain background (the model from noise does not)
    assert result["from_real"][-1]["judge"]["background"] == 1.0
