"""Documents across ranks: computing the pieces that cross a shard boundary (plan: `ring_attention.streams`).

A rank packs the rows it owns of every spanning stream into tables — its queries ``[n_q, D]``, its keys and
values ``[n_k, D]`` — received first from their natural owners when causal load balance moves them. Its queries meet
the keys they may see in `ring_attention.varlen.Buckets` over those tables, with the keys gathered at once or
rotated step by step around each stream's span (`SpanningStreams`). The results go back to the rows' natural
owners and merge into their output; the backward recomputes the same blocks from the kept tables and sends every
gradient home: dq and the dK, dV of keys received (gathered) or carried around the ring (accumulators that travel
with the keys and take one last hop home).
"""

from __future__ import annotations

import torch

from ring_attention import comm as C
from ring_attention.kernels import lse_dtype
from ring_attention.merge import merge_partials
from ring_attention.streams import Moves, RingStep, StreamPlan
from ring_attention.varlen import Buckets, RowSource


def exchange(sends: dict[int, list[torch.Tensor]], receives: dict[int, list[torch.Tensor]], group) -> None:
    """Send and receive lists of tensors per group rank, in one batch of point-to-point messages (both sides list a
    pair's tensors in the same order; empty ones are skipped on both)."""
    C.send_and_receive([(t, peer) for peer in sorted(sends) for t in sends[peer] if t.numel()],
                       [(t, peer) for peer in sorted(receives) for t in receives[peer] if t.numel()], group)


def _empty(like: torch.Tensor, rows: int, dtype=None) -> torch.Tensor:
    return like.new_empty((rows, *like.shape[1:]), dtype=dtype or like.dtype)


def fill_tables(moves: Moves, sources: list[torch.Tensor], size: int, group) -> list[torch.Tensor]:
    """Tables ``[size, ...]`` of the rows this rank owns, from ``sources`` (``[B, L, H, ...]`` tensors, or row tables
    ``[R, ...]`` in contiguous numbering): its own rows copied, the others received from their natural owners."""
    rows = [RowSource(s) if s.dim() == 4 else s for s in sources]
    take = [lambda index, r=r: r.take(index) if isinstance(r, RowSource) else r.index_select(0, index) for r in rows]
    tables = [_empty(t(moves.local_rows[:0]), size) for t in take]
    for table, t in zip(tables, take):
        table[moves.local_positions] = t(moves.local_rows)
    incoming = {a: [_empty(table, len(positions)) for table in tables] for a, positions in moves.incoming.items()}
    exchange({c: [t(rows_) for t in take] for c, rows_ in moves.outgoing.items()}, incoming, group)
    for a, positions in moves.incoming.items():
        for table, received in zip(tables, incoming[a]):
            table[positions] = received
    return tables


def return_rows(moves: Moves, tables: list[torch.Tensor], group) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The reverse of `fill_tables` for results: ``(rows, values)`` for this rank's own rows (contiguous numbering),
    from its tables and from the owners of the rows it sent."""
    back = {c: [_empty(t, len(rows)) for t in tables] for c, rows in moves.outgoing.items()}
    exchange({a: [t[positions] for t in tables] for a, positions in moves.incoming.items()}, back, group)
    arrived = [(moves.local_rows, [t[moves.local_positions] for t in tables])]
    return arrived + [(moves.outgoing[c], back[c]) for c in sorted(back)]


def _run(buckets: list[Buckets], method: str, *args) -> None:
    for bucket in buckets:
        getattr(bucket, method)(*args)


class SpanningStreams:
    """A call's part for one pair's spanning pieces (see `ring_attention.tiled` for what a part is)."""

    def __init__(self, plan: StreamPlan, kernel, group):
        self.plan, self.kernel, self.group = plan, kernel, group

    def forward(self, q, k, v, out, lse):
        plan, group = self.plan, self.group
        (q_table,) = fill_tables(plan.q_moves, [q], plan.q_size, group)  # [n_q, D]
        k_table, v_table = fill_tables(plan.k_moves, [k, v], plan.k_size, group)  # [n_k, D]
        acc_dtype = lse_dtype(q.dtype)
        out_table = q_table.new_zeros(q_table.shape, dtype=acc_dtype)
        lse_table = q_table.new_full(q_table.shape[:1], -torch.inf, dtype=acc_dtype)
        queries = [t.view(1, -1, 1, t.shape[-1]) for t in (q_table,)] + [out_table.view(1, -1, 1, q.shape[-1]),
                                                                        lse_table.view(1, -1, 1)]
        if plan.gathered is not None:
            keys, values = self._gather(k_table, v_table)
            _run(plan.gathered.buckets, "forward", queries[0], *_as_space(keys, values), *queries[1:], self.kernel)
            kept = (q_table, keys, values)
        else:
            held = [k_table, v_table]
            for step in plan.ring:
                pending = self._start_rotation(step, held)
                _run(step.buckets, "forward", queries[0], *_as_space(*held), *queries[1:], self.kernel)
                held = self._finish_rotation(step, pending, held)
            kept = (q_table, k_table, v_table)
        out_rows, lse_rows = out.view(-1, out.shape[-1]), lse.view(-1)
        for rows, (part_out, part_lse) in return_rows(plan.q_moves, [out_table, lse_table], group):
            merged_out, merged_lse = merge_partials(out_rows.index_select(0, rows), lse_rows.index_select(0, rows),
                                                    part_out, part_lse)
            out_rows.index_copy_(0, rows, merged_out)
            lse_rows.index_copy_(0, rows, merged_lse)
        return kept

    def backward(self, dout, q, k, v, out, lse, grads, kept) -> None:
        plan, group = self.plan, self.group
        if kept is None:  # nothing kept between the passes (ring_attention.ops): the tables are filled again
            (q_table,) = fill_tables(plan.q_moves, [q], plan.q_size, group)
            k_table, v_table = fill_tables(plan.k_moves, [k, v], plan.k_size, group)
            kept = (q_table, *self._gather(k_table, v_table)) if plan.gathered is not None else (q_table, k_table,
                                                                                                 v_table)
        dout_table, out_table, lse_table = fill_tables(plan.q_moves, [dout, out, lse.unsqueeze(-1)], plan.q_size,
                                                       group)
        acc_dtype = lse_dtype(q.dtype)
        dq_table = out_table.new_zeros(out_table.shape, dtype=acc_dtype)
        queries = [t.view(1, -1, 1, t.shape[-1]) for t in (dout_table, kept[0])]
        rows = [out_table.view(1, -1, 1, q.shape[-1]), lse_table.view(1, -1, 1), dq_table.view(1, -1, 1, q.shape[-1])]
        if plan.gathered is not None:
            keys, values = kept[1:]
            dkv = [torch.zeros(keys.shape, dtype=acc_dtype, device=keys.device) for _ in range(2)]
            _run(plan.gathered.buckets, "backward", *queries, *_as_space(keys, values), *rows[:2], rows[2],
                 *_as_space(*dkv), self.kernel)
            dk_table, dv_table = self._return_gathered(dkv)
        else:
            dk_table, dv_table = (torch.zeros((plan.k_size, k.shape[-1]), dtype=acc_dtype, device=k.device)
                                  for _ in range(2))
            held = list(kept[1:])
            accumulators = [torch.zeros((plan.ring[0].size if plan.ring else 0, k.shape[-1]), dtype=acc_dtype,
                                        device=k.device) for _ in range(2)]
            for step in plan.ring:
                pending = self._start_rotation(step, held)
                _run(step.buckets, "backward", *queries, *_as_space(*held), *rows[:2], rows[2],
                     *_as_space(*accumulators), self.kernel)
                held = self._finish_rotation(step, pending, held)
                accumulators = self._rotate_accumulators(step, accumulators, [dk_table, dv_table])
        for moves, tables, grad_tensors in ((plan.q_moves, [dq_table], grads[:1]),
                                            (plan.k_moves, [dk_table, dv_table], grads[1:])):
            for index, values in return_rows(moves, tables, group):
                for grad, value in zip(grad_tensors, values):
                    grad.view(-1, grad.shape[-1]).index_put_((index,), value.to(grad.dtype), accumulate=True)

    def _gather(self, k_table, v_table):
        """The key buffer: this rank's keys and values followed by what each peer sends."""
        gathered = self.plan.gathered
        received = {o: [_empty(k_table, n), _empty(v_table, n)] for o, n in gathered.receive.items()}
        exchange({x: [k_table[rows], v_table[rows]] for x, rows in gathered.send.items()}, received, self.group)
        order = sorted(received)
        return (torch.cat([k_table, *(received[o][0] for o in order)]),
                torch.cat([v_table, *(received[o][1] for o in order)]))

    def _return_gathered(self, dkv):
        """dK, dV of this rank's key table: its own share plus what the peers computed for the rows it sent."""
        gathered, k_size = self.plan.gathered, self.plan.k_size
        dk_table, dv_table = dkv[0][:k_size].clone(), dkv[1][:k_size].clone()
        offset, sends = k_size, {}
        for o in sorted(gathered.receive):
            n = gathered.receive[o]
            sends[o] = [dkv[0][offset: offset + n], dkv[1][offset: offset + n]]
            offset += n
        received = {x: [_empty(dk_table, len(rows)), _empty(dv_table, len(rows))] for x, rows in gathered.send.items()}
        exchange(sends, received, self.group)
        for x, rows in gathered.send.items():
            dk_table.index_add_(0, rows, received[x][0])
            dv_table.index_add_(0, rows, received[x][1])
        return dk_table, dv_table

    def _start_rotation(self, step: RingStep, held):
        """Post the next step's keys and values (each stream's block to its span successor) before computing."""
        incoming = {a: [_empty(t, len(positions)) for t in held] for a, positions in step.receive.items()}
        sends = [(t[positions], x) for x, positions in sorted(step.send.items()) for t in held]
        receives = [(t, a) for a in sorted(incoming) for t in incoming[a]]
        return incoming, C.post(sends, receives, self.group)

    def _finish_rotation(self, step: RingStep, pending, held):
        incoming, requests = pending
        for request in requests:
            request.wait()
        arrived = [_empty(t, step.size_after) for t in held]
        for a, positions in step.receive.items():
            for table, received in zip(arrived, incoming[a]):
                table[positions] = received
        return arrived

    def _rotate_accumulators(self, step: RingStep, accumulators, home):
        incoming = {a: [_empty(t, len(positions)) for t in accumulators] for a, positions in
                    step.accumulate_receive.items()}
        exchange({x: [t[positions] for t in accumulators] for x, positions in step.accumulate_send.items()},
                 incoming, self.group)
        held, keys = step.accumulate_home
        for table, accumulator in zip(home, accumulators):
            table.index_add_(0, keys, accumulator[held])
        moved = [accumulators[0].new_zeros((step.size_after, accumulators[0].shape[-1])) for _ in range(2)]
        for a, positions in step.accumulate_receive.items():
            here = positions < step.size_after
            for target, table, received in zip(moved, home, incoming[a]):
                target.index_add_(0, positions[here], received[here])
                table.index_add_(0, positions[~here] - step.size_after, received[~here])
        return moved


def _as_space(*tables: torch.Tensor) -> list[torch.Tensor]:
    """Row tables ``[n, D]`` as the ``[1, n, 1, D]`` spaces `Buckets` index."""
    return [t.view(1, -1, 1, t.shape[-1]) for t in tables]
