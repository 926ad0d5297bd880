"""The upstream client feeds ``h2`` what follows a GOAWAY in a call of its own (so the streams the
GOAWAY let through can finish): whatever the packet boundaries, the bytes are passed on whole and
in order, cut right after each GOAWAY frame and nowhere a GOAWAY does not end."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.edge.h2client import _GoawaySplitter

GOAWAY = 0x7


def frame(kind: int, size: int) -> bytes:
    return size.to_bytes(3, "big") + bytes([kind, 0]) + b"\0\0\0\1" + b"p" * size


frames = st.lists(
    st.tuples(st.sampled_from([0x0, 0x1, 0x4, 0x6, GOAWAY, 0x8, 0x9]), st.integers(0, 40)), max_size=12
)


@given(frames, st.lists(st.integers(1, 30), min_size=1, max_size=50))
def test_pieces_end_after_each_goaway_and_keep_every_byte(
    spec: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = b"".join(frame(kind, size) for kind, size in spec)
    ends_of_goaway, position = set(), 0
    for kind, size in spec:
        position += 9 + size
        if kind == GOAWAY:
            ends_of_goaway.add(position)
    splitter, pieces, position, index = _GoawaySplitter(), [], 0, 0
    while position < len(data):  # the data in packets of arbitrary sizes
        packet = data[position : position + cuts[index % len(cuts)]]
        position += len(packet)
        index += 1
        pieces.append(splitter.split(packet))
    assert b"".join(b"".join(p) for p in pieces) == data
    boundaries, position = set(), 0
    for packet_pieces in pieces:
        for piece in packet_pieces[:-1]:
            position += len(piece)
            boundaries.add(position)
        position += len(packet_pieces[-1]) if packet_pieces else 0
    assert boundaries <= ends_of_goaway  # cut nowhere else within a packet
    packet_ends, position = set(), 0
    for packet_pieces in pieces:
        position += sum(len(p) for p in packet_pieces)
        packet_ends.add(position)
    assert ends_of_goaway <= boundaries | packet_ends  # and after every GOAWAY
