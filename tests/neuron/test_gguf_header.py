"""The GGUF header reader placement uses, against the gguf package's full reader."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFReader

from helexa.neuron.gguf_header import ArrayField, read_header
from helexa.neuron.weights_check import GGUF_READ_ERRORS
from helexa.up.tiny_model import GGUF_F16_FILENAME, write_tiny_model_to_hf_cache


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory, real_models: tuple[Path, Path]) -> list[Path]:
    tiny = write_tiny_model_to_hf_cache(tmp_path_factory.mktemp("hub"), "t/x", with_gguf=True)
    return [real_models[0], Path(tiny) / GGUF_F16_FILENAME]


def test_fields_and_tensor_extent_match_the_full_reader(ggufs: list[Path]) -> None:
    for path in ggufs:
        header = read_header(path)
        reader = GGUFReader(path)
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):  # the reader's own pseudo-fields
                continue
            mine = header.fields[name]
            if isinstance(mine, ArrayField):
                assert mine.count == len(field.data), name
            else:
                assert mine == pytest.approx(field.contents()), name
        assert header.tensors == len(reader.tensors)
        assert header.elements == sum(int(t.n_elements) for t in reader.tensors)
        assert header.data_end == max(t.data_offset + t.n_bytes for t in reader.tensors)
        assert header.data_end == path.stat().st_size


def test_damage_is_one_of_the_read_errors(ggufs: list[Path], tmp_path: Path) -> None:
    data = ggufs[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:5000])  # inside the vocabulary's strings
    with pytest.raises(GGUF_READ_ERRORS):
        read_header(cut)
    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])  # the header whole, half the tensors missing
    assert read_header(half).data_end > half.stat().st_size
    bad_type = tmp_path / "bad.gguf"
    bad_type.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99)
    )
    with pytest.raises(GGUF_READ_ERRORS):
        read_header(bad_type)
