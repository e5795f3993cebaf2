"""The frames of an engine's /generate answer (fleet.wire.protocol): encoded one after another and
split back into the same frames, in order, however the bytes arrive."""

from __future__ import annotations

import pytest

from fleet.wire import protocol

FRAMES: list[protocol.Frame] = [
    protocol.Prompt(token_ids=[1, 2, 3]),
    *(protocol.Delta(index=0, text=f" t{k}", token_ids=[100 + k]) for k in range(5)),
    protocol.Delta(index=0, text="é" * 300, token_ids=[7], finish_reason="length"),
    protocol.Done(prompt_tokens=3, completion_tokens=6),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64, 1 << 20])
def test_frame_splitter_yields_every_frame_in_order_however_the_bytes_are_chunked(chunk: int) -> None:
    wire = b"".join(protocol.encode_frame(f) for f in FRAMES)
    splitter = protocol.FrameSplitter()
    got: list[protocol.Frame] = []
    for start in range(0, len(wire), chunk):
        got += splitter.feed(wire[start : start + chunk])
    assert got == FRAMES
    assert splitter.pending == 0


def test_frame_splitter_holds_back_an_incomplete_frame() -> None:
    wire = protocol.encode_frame(FRAMES[0]) + protocol.encode_frame(FRAMES[1])
    splitter = protocol.FrameSplitter()
    assert splitter.feed(wire[:-1]) == [FRAMES[0]]
    assert splitter.pending == len(protocol.encode_frame(FRAMES[1])) - 1
    assert splitter.feed(wire[-1:]) == [FRAMES[1]]


def test_frame_splitter_returns_the_frames_before_one_that_does_not_decode_and_reads_no_further() -> None:
    bad = protocol.encode_frame(protocol.Delta(index=0, text="", finish_reason="error"))  # type: ignore[arg-type]
    splitter = protocol.FrameSplitter()
    assert splitter.feed(protocol.encode_frame(FRAMES[0]) + bad + protocol.encode_frame(FRAMES[1])) == [FRAMES[0]]
    assert splitter.unreadable is not None and "finish_reason" in splitter.unreadable
    assert splitter.feed(protocol.encode_frame(FRAMES[1])) == []
