"""Train a small Llama from scratch with its sequence split over processes, through ring dilated attention.

    torchrun --nproc-per-node 2 examples/hf_llama_sequence_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/hf_llama_sequence_parallel.py --cuda     # GPUs, NCCL
    torchrun --nproc-per-node 2 examples/hf_llama_sequence_parallel.py --packed   # packed documents
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 --max-restarts 1 \
        examples/hf_llama_sequence_parallel.py --checkpoint-dir checkpoints                  # survives a lost rank

A character-level ``LlamaForCausalLM`` (built from a config, nothing downloaded) learns a text file (by default
a text generated here from a few templates, the same on every run). Every rank holds one contiguous slice of each
512-token sequence: ``apply_ring_dilated_attention``, ``shard_batch`` and ``sequence_parallel_loss``, with
``sum_gradients`` after the backward, are the lines that make a Hugging Face training loop sequence-parallel. The loss
printed is the loss of whole sequences. With ``--packed`` each step is one row of documents (1 to 16 sentences each)
laid end to end by ``transformers``' ``DataCollatorWithFlattening``: ``shard_batch`` turns its restarting positions
into the documents' boundaries, which the model call hands to the attention layers, and no token attends across a
document.

With ``--checkpoint-dir``, every ``--checkpoint-every`` steps all ranks save a distributed checkpoint
(``torch.distributed.checkpoint``: the model, the optimizer, the step and the state of the batch sampler), and
a start resumes from the last one. Under ``torchrun --max-restarts N`` a rank that dies makes the launcher stop
the others and start the group again, which resumes: the steps after the checkpoint are computed again from the
same state, so the run continues exactly as if nothing had happened (``--fail-at-step`` kills a rank to try it).
Launch restarts with the c10d rendezvous (``--standalone`` on one machine) and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the store the launcher shares by default, the restarted ranks can
read the dead ranks' addresses and fail to connect (pytorch/pytorch#135712; measured here with torch 2.13).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch, sum_gradients

SEGMENTS, RATES = [64, 128, 256, 512], [1, 2, 4, 8]  # 512 tokens; on 2 ranks the last pair spans both


def generated_text(sentences: int = 4000) -> str:
    """Sentences from a few templates: structure a small model can learn, the same text on every run."""
    rng = random.Random(0)
    who = ["the ring", "every rank", "a query", "the kernel", "each head", "the segment", "the merge"]
    does = ["passes", "keeps", "attends to", "sends", "computes", "gathers", "returns"]
    what = ["its keys", "the dilated rows", "one block", "the log-sum-exp", "the next shard", "every value"]
    how = ["in order", "twice", "exactly", "at every step", "without a copy", "to its neighbour"]
    return " ".join(f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)} {rng.choice(how)}."
                    for _ in range(sentences))


def documents_of(text: str, longest: int) -> list[str]:
    """``--packed``: the text cut into documents of 1 to 16 consecutive sentences (at most ``longest`` characters),
    the same documents on every run."""
    rng = random.Random(2)
    sentences = [sentence.strip() + "." for sentence in text.split(".") if sentence.strip()]
    documents, start = [], 0
    while start < len(sentences):
        count = rng.randint(1, 16)
        documents.append(" ".join(sentences[start: start + count])[:longest])
        start += count
    return documents


def packed_batch(documents: list[torch.Tensor], tokens: int, generator: torch.Generator) -> dict:
    """``--packed``: documents drawn at random until ``tokens`` are filled (the last one cut short), laid end to end
    in one row by ``DataCollatorWithFlattening``: ``position_ids`` restart at 0 in each document, and the labels
    hold ``-100`` on each document's first token."""
    features, filled = [], 0
    while filled < tokens:
        document = documents[int(torch.randint(len(documents), (), generator=generator))][: tokens - filled]
        features.append({"input_ids": document.tolist()})
        filled += len(document)
    return DataCollatorWithFlattening()(features)


class TrainingState:
    """What a checkpoint holds, in the form ``torch.distributed.checkpoint`` saves and loads in place: the model
    and optimizer (their distributed state dicts), the next step, and the batch sampler's random state (where
    the data stream is)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Generator):
        self.model, self.optimizer, self.batches, self.step = model, optimizer, batches, 0

    def state_dict(self) -> dict:
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return dict(model=model, optimizer=optimizer, step=self.step, batches=self.batches.get_state())

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.step = state["step"]
        self.batches.set_state(state["batches"])


def save_checkpoint(state: TrainingState, directory: Path) -> None:
    """Every rank writes its part; ``dcp.save`` returns once rank 0 has written the metadata after all of them,
    and only then does rank 0 point ``latest`` at it, so a checkpoint cut short by a failure is never resumed."""
    dcp.save({"training": state}, checkpoint_id=directory / f"step-{state.step:06d}")
    if dist.get_rank() == 0:
        (directory / "latest.tmp").write_text(f"step-{state.step:06d}")
        os.replace(directory / "latest.tmp", directory / "latest")


def resume(state: TrainingState, directory: Path) -> bool:
    """Load the last complete checkpoint in ``directory`` into ``state``; False when there is none."""
    if not (directory / "latest").exists():
        return False
    dcp.load({"training": state}, checkpoint_id=directory / (directory / "latest").read_text())
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a text file to learn (default: generated)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL")
    parser.add_argument("--packed", action="store_true", help="train on packed documents of 1 to 16 sentences of "
                        "the text: --batch x 512 tokens per step in one row, each document attending only to itself")
    parser.add_argument("--loss-log", type=Path, help="append each step's loss here, all digits (a step computed "
                        "again after a restart appears again)")
    parser.add_argument("--checkpoint-dir", type=Path, help="save checkpoints here and resume from the last one")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--fail-at-step", type=int, help="to try recovery: the last rank dies at this step, on "
                        "the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT is 0)")
    args = parser.parse_args()
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank()
    restarts_share_the_store = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
                                and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    if restarts_share_the_store and rank == 0:
        print("warning: after a restart the ranks may fail to connect through the launcher's shared store "
              "(pytorch/pytorch#135712): launch with --standalone or --rdzv-backend c10d, and "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", flush=True)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    sequence_group = dist.group.WORLD  # here every rank holds a slice of the same sequences

    text = open(args.text).read() if args.text else generated_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    seq_len = SEGMENTS[-1]
    index = {c: i for i, c in enumerate(vocab)}
    documents = [torch.tensor([index[c] for c in d]) for d in documents_of(text, seq_len)] if args.packed else []

    torch.manual_seed(0)  # the same initial model on every rank
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    model = LlamaForCausalLM(config).to(device)
    apply_ring_dilated_attention(model, SEGMENTS, RATES, process_group=sequence_group)  # 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank
    state = TrainingState(model, optimizer, batches)
    if args.checkpoint_dir is not None:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if resume(state, args.checkpoint_dir) and rank == 0:
            print(f"resumed from {args.checkpoint_dir / f'step-{state.step:06d}'}: step {state.step}", flush=True)
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    progress = tqdm(range(state.step, args.steps), desc="training", disable=rank != 0, initial=state.step,
                    total=args.steps)
    for step in progress:
        if step == args.fail_at_step and first_attempt and rank == dist.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: no exception, no clean-up
        if args.packed:  # documents laid end to end: shard_batch also returns their boundaries for the model
            batch = packed_batch(documents, args.batch * seq_len, batches)
            input_ids, position_ids, labels, cu_seq_lens_q = shard_batch(  # 2
                batch["input_ids"].to(device), batch["labels"].to(device),
                position_ids=batch["position_ids"].to(device), process_group=sequence_group)
            logits = model(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q,
                           use_cache=False).logits
        else:
            starts = torch.randint(0, len(ids) - seq_len, (args.batch,), generator=batches)
            input_ids = torch.stack([ids[s: s + seq_len] for s in starts.tolist()]).to(device)
            input_ids, position_ids, labels = shard_batch(input_ids, process_group=sequence_group)  # 2
            logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        loss = sequence_parallel_loss(logits, labels, process_group=sequence_group)  # 3: this rank's share
        optimizer.zero_grad()
        loss.backward()
        sum_gradients(model, sequence_group)  # each rank's gradient covers its own tokens
        optimizer.step()
        whole = loss.detach().clone()
        dist.all_reduce(whole, group=sequence_group)  # the shares add up to the loss of whole sequences
        progress.set_postfix(loss=f"{whole.item():.3f}")
        if rank == 0 and step in (0, args.steps - 1):
            progress.write(f"step {step}: loss {whole.item():.3f}")
        if rank == 0 and args.loss_log is not None:
            with open(args.loss_log, "a") as log:
                log.write(f"{step} {whole.item()!r}\n")
        state.step = step + 1
        if args.checkpoint_dir is not None and state.step % args.checkpoint_every == 0:
            save_checkpoint(state, args.checkpoint_dir)
    dist.barrier()  # no rank tears its connections down while a peer may still be using them (a gloo abort otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
