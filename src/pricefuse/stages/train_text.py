"""Stage `train_text`: the fine-tuned text member, if in ensemble.members (models.text.member)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.text.member import disabled_text_member, text_enabled, train_text_member
from pricefuse.models.text.training import make_accelerator
from pricefuse.pipeline.inputs import load_parsed
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_parsed(layout, "train"), load_parsed(layout, "test")
    if not text_enabled(params):
        with tracking.stage_run(STAGE, params, inputs=[layout.interim_dir]) as run:
            tracking.record(run, STAGE, disabled_text_member(layout))
        return
    accelerator = make_accelerator(params.text)  # one process, or one of torchrun's N
    try:
        main = accelerator.is_main_process  # only it logs the run and writes the outputs
        upstream = [layout.interim_dir]
        with tracking.stage_run_on_main(main, STAGE, params, upstream, "text.device") as run:
            result = train_text_member(params.text, train, test, layout, accelerator, progress=True)
            if run is not None:
                if accelerator.device.type == "cuda":  # data parallel: one GPU per process
                    result.tags["gpu_count"] = str(accelerator.num_processes)
                tracking.record(run, STAGE, result)
    finally:
        accelerator.end_training()
