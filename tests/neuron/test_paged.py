"""The transformers engine's paged KV cache and attention, in-process: block arithmetic as pure
functions, and the packed forward pass against the model's own attention on whole sequences."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from helexa.neuron.harness.engine import StepChunk
from helexa.neuron.harness.slots import plan_step
from helexa.neuron.harness.transformers.batched import PagedBackend, kv_shape, use_paged_attention
from helexa.neuron.harness.transformers.paged import (
    KvShape,
    PagedKv,
    blocks_needed,
    cells,
    contiguous_start,
)

CPU = torch.device("cpu")


def test_block_arithmetic() -> None:
    # A slot with 2 blocks of 4 (positions 0..7) writing 7..10 needs one more block.
    assert blocks_needed(2, 7, 11, 4, first_block_shared=False) == 1
    # Writing into a shared block first takes a private copy of it.
    assert blocks_needed(2, 6, 8, 4, first_block_shared=True) == 1
    assert blocks_needed(2, 8, 9, 4, first_block_shared=True) == 1  # past the table: new block
    assert cells([5, 2], 2, 6, 4) == [22, 23, 8, 9]
    assert contiguous_start([3, 4, 9], 8, 4) == 12  # only the blocks in use must be adjacent
    assert contiguous_start([3, 5], 8, 4) is None


def test_chunked_prefill_keeps_every_decoding_sequence_in_the_step() -> None:
    chunks = plan_step([0, 1], [(2, 4000), (3, 10)], budget=256)
    assert [(c.key, c.count) for c in chunks] == [(0, 1), (1, 1), (2, 254)]


def test_blocks_are_shared_copied_on_write_and_freed() -> None:
    kv = PagedKv(
        KvShape(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32),
        blocks=6,
        block_size=4,
        device=CPU,
    )
    assert kv.reserve(0, 0, 6) == [0, 1, 2, 3, 4, 5]
    kv.keys[0][0, :6] = torch.arange(6.0)[:, None]
    kv.share(0, 1, 6)  # both blocks shared: nothing copied
    assert kv.tables[1] == [0, 1] and kv.free_tokens() == 16
    # Slot 1 writes position 6, inside the shared second block: it gets its own copy first.
    assert kv.needed(1, 6, 7) == 1
    assert kv.reserve(1, 6, 7) == [10]
    assert kv.tables[1] == [0, 2] and kv.keys[0][0, 8:10, 0].tolist() == [4.0, 5.0]
    assert not kv.fits([(0, 6, 30)])  # 6 more blocks than there are
    kv.forget(0)
    assert kv.free_tokens() == 16  # block 1 is free; block 0 is still slot 1's
    kv.forget(1, 3)
    assert kv.tables[1] == [0] and kv.free_tokens() == 20


@pytest.fixture(scope="module")
def models() -> tuple[Qwen3ForCausalLM, Qwen3ForCausalLM]:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    reference = Qwen3ForCausalLM(config).eval()
    paged = Qwen3ForCausalLM(copy.deepcopy(config)).eval()
    paged.load_state_dict(reference.state_dict())
    use_paged_attention(paged)
    return reference, paged


def test_packed_step_matches_whole_sequence_attention(
    models: tuple[Qwen3ForCausalLM, Qwen3ForCausalLM],
) -> None:
    """Prompt chunks, decodes, shared prefixes and copied blocks in one packed forward give
    the logits the model computes on each whole sequence with its own attention."""
    reference, paged = models
    shape = kv_shape(paged)
    assert shape == KvShape(layers=2, kv_heads=2, head_dim=16, dtype=torch.float32)
    kv = PagedKv(shape, blocks=32, block_size=8, device=CPU)
    backend = PagedBackend(paged, kv, CPU)
    generator = torch.Generator().manual_seed(1)
    sequences = {
        0: torch.randint(0, 300, (50,), generator=generator).tolist(),
        1: torch.randint(0, 300, (3,), generator=generator).tolist(),
    }
    cached = {0: 0, 1: 0}
    kv.reserve(9, 0, 20)  # a stranger's blocks, so slot 0's table is not contiguous

    def step(feeds: list[tuple[int, list[int]]]) -> None:
        chunks = [StepChunk(slot, tokens, cached[slot], True) for slot, tokens in feeds]
        assert backend.decode(chunks)
        logits = backend._logits
        assert logits is not None
        for (slot, tokens), row in zip(feeds, logits, strict=True):
            cached[slot] += len(tokens)
            with torch.no_grad():
                whole = reference(torch.tensor([sequences[slot][: cached[slot]]])).logits[0, -1]
            torch.testing.assert_close(row, whole, atol=1e-4, rtol=1e-4)

    step([(0, sequences[0][:30]), (1, sequences[1])])  # two prompts, one packed row
    kv.forget(9)
    kv.reserve(8, 0, 24)
    step([(0, sequences[0][30:])])  # the rest of a chunked prompt, attending its first part
    for token in (7, 8, 9):  # both decoding: one padded attention call
        sequences[0].append(token)
        sequences[1].append(token + 1)
        step([(0, [token]), (1, [token + 1])])
    # A second conversation sharing 45 of slot 0's positions, then diverging.
    kv.share(0, 2, 45)
    sequences[2] = [*sequences[0][:45], 5, 6, 7]
    cached[2] = 45
    sequences[0].append(11)
    step([(2, [5, 6, 7]), (0, [11])])
    assert kv.tables[2][:5] == kv.tables[0][:5] and kv.tables[2][5] != kv.tables[0][5]


def test_sampling_reads_every_row_once(models: tuple[Qwen3ForCausalLM, Qwen3ForCausalLM]) -> None:
    _reference, paged = models
    backend = PagedBackend(paged, PagedKv(kv_shape(paged), blocks=8, block_size=8, device=CPU), CPU)
    assert backend.decode([StepChunk(0, [1, 2, 3], 0, False), StepChunk(1, [4], 0, True)])
    assert backend._logits is not None and backend._logits.shape[0] == 1  # only slot 1's row
