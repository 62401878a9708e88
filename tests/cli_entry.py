"""The real CLI (`python tests/cli_entry.py distill RECIPE`, or under torchrun on every rank) with
what the tests need to observe or break, set through environment variables:

GENRECAL_TEST_RECORD=DIR   each rank writes DIR/rank-<r>.json (what accelerate saw: its index and
                           the number of processes), appends every training row index it
                           encodes to DIR/items-<r>.txt and, when the teacher / the student is
                           sharded, writes the share of it that it holds to DIR/teacher-<r>.json
                           / DIR/student-<r>.json
GENRECAL_TEST_NAN=R:N      on rank R, the N-th call of the student's L_sft returns NaN
GENRECAL_TEST_SIGNAL=S:N   the process sends itself signal S (e.g. SIGTERM) from inside its N-th
                           optimizer step (counted across stages), before the parameters move
GENRECAL_TEST_FAIL=R:N     on rank R, encoding the N-th item (in a loader worker where there are
                           workers) raises a DataError naming it: an error only that rank meets
GENRECAL_TEST_SIDE=DIR     each call of the side computations (alignment statistics, the reliance
                           probe, greedy generation for the accuracy table) appends to
                           DIR/side-<rank>.jsonl a JSON line: its name, whether CPU autocast was on
                           and in which dtype, and for generation each question and its answer
"""

import json
import os
import sys
from pathlib import Path


def main() -> None:
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU") == "1")  # as Accelerator() reads it
    record = os.environ.get("GENRECAL_TEST_RECORD")
    if record:
        out = Path(record)
        out.mkdir(parents=True, exist_ok=True)
        view = {"process_index": state.process_index, "num_processes": state.num_processes,
                "distributed_type": str(state.distributed_type)}
        (out / f"rank-{state.process_index}.json").write_text(json.dumps(view))
        from genrecal_cli.data.loader import PairDataset

        real = PairDataset.__getitem__

        def recording(self, idx):
            with open(out / f"items-{state.process_index}.txt", "a") as f:
                f.write(f"{idx}\n")
            return real(self, idx)

        PairDataset.__getitem__ = recording
        from genrecal_cli.engine import distill as engine_distill
        from genrecal_cli.engine.parallel import local_share

        real_shard = engine_distill.shard_teacher

        def shard_and_record(teacher, accelerator, mesh):
            on_meta = any(p.is_meta for p in teacher.model.parameters())  # this process read no weights
            real_shard(teacher, accelerator, mesh)
            shares = {"inner": local_share(teacher.model.model), "head": local_share(teacher.model.get_output_embeddings()),
                      "loaded_on_meta": on_meta}
            (out / f"teacher-{state.process_index}.json").write_text(json.dumps(shares))

        engine_distill.shard_teacher = shard_and_record
        from genrecal_cli.engine.teacher import teach as engine_teach

        engine_teach.shard_teacher = shard_and_record
        real_trainable = engine_distill.shard_trainable

        def shard_trainable_and_record(module, mesh, compute_dtype=None):
            real_trainable(module, mesh, compute_dtype)
            shares = {"student": local_share(module.student), "recalibrator": local_share(module.recalibrator) if module.recalibrator is not None else None}
            (out / f"student-{state.process_index}.json").write_text(json.dumps(shares))

        engine_distill.shard_trainable = shard_trainable_and_record
    nan = os.environ.get("GENRECAL_TEST_NAN")
    if nan:
        rank, at = map(int, nan.split(":"))
        if state.process_index == rank:
            from genrecal_cli.engine import objective

            real_sft, calls = objective.losses.sft, []

            def poisoned(*args, **kwargs):
                calls.append(1)
                value = real_sft(*args, **kwargs)
                return value * float("nan") if len(calls) == at else value

            objective.losses.sft = poisoned
    fail = os.environ.get("GENRECAL_TEST_FAIL")
    if fail:
        rank, at = map(int, fail.split(":"))
        if state.process_index == rank:
            from genrecal_cli.data.loader import PairDataset
            from genrecal_cli.errors import DataError

            real_item, seen = PairDataset.__getitem__, []

            def failing(self, idx):
                seen.append(idx)  # (per loader worker: each counts its own items)
                if len(seen) == at:
                    raise DataError(f"injected: row {idx} cannot be read on process {rank}")
                return real_item(self, idx)

            PairDataset.__getitem__ = failing
    side = os.environ.get("GENRECAL_TEST_SIDE")
    if side:
        import torch

        from genrecal_cli.data.formats import text_of
        from genrecal_cli.engine import accuracy, probe, stages

        Path(side).mkdir(parents=True, exist_ok=True)

        def recorded(name, fn):
            def call(*args, **kwargs):
                row = {"fn": name, "autocast": torch.is_autocast_enabled("cpu"), "dtype": str(torch.get_autocast_dtype("cpu"))}
                result = fn(*args, **kwargs)
                if name == "generate_answers":  # (vlm, prompts, images): each prompt's last question, answered
                    row["answers"] = [[text_of(p.messages[-1]), a] for p, a in zip(args[1], result)]
                with open(Path(side) / f"side-{state.process_index}.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                return result

            return call

        stages.alignment_stats = recorded("alignment_stats", stages.alignment_stats)
        probe.reliance = recorded("reliance", probe.reliance)
        accuracy.generate_answers = recorded("generate_answers", accuracy.generate_answers)
    sig = os.environ.get("GENRECAL_TEST_SIGNAL")
    if sig:
        import signal

        import torch

        name, at = sig.split(":")
        real_step, steps = torch.optim.AdamW.step, []

        def step_with_signal(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == int(at):
                os.kill(os.getpid(), getattr(signal, name))  # handled by the next bytecode, inside this step
            return real_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step_with_signal
    from genrecal_cli.cli import main as cli_main

    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
