"""Canonical Huffman coding of a stream of small symbols (the indices of a shared weight).

Deep Compression Huffman-coded its cluster indices; so does this. A stream is one uint8 tensor,
self-describing and checked:

- a fixed header (big-endian): magic ``b"LH"``, format 1, the alphabet size ``A`` (uint16, 1 to
  256), the longest code length, the symbols per lane ``S`` (uint32), the symbol count and the
  payload's length in bits (uint64 each), and a CRC-32 over everything after it;
- the ``A`` canonical code lengths, one nibble each (0: the symbol does not occur), high nibble
  first: the codes themselves follow from the lengths alone;
- the bit length of every lane but the last (uint16 each): the symbols are cut into lanes of
  ``S`` consecutive symbols, so that a decoder can start every lane at once;
- the payload: every symbol's code in order, most significant bit first.

Decoding is vectorised across lanes: one table lookup per symbol position over all lanes at
once (numpy), so a stream of millions of symbols decodes in a few thousand vector steps; encoding
has no loop over symbols at all. The lane lengths cost 16 bits per 4096 symbols (0.004
bits/symbol). A code is at most 15 bits long (counts are halved until the Huffman code fits),
which keeps the lookup table at 2^15 entries and the lengths in a nibble.

A stream is rejected with a :class:`ValueError` rather than decoded into garbage when it is
truncated or has trailing bytes, when its CRC does not match, when its code lengths are not a
complete prefix code, when a code in the payload is not one of them, when a lane does not end
exactly where the next begins, or when its symbol count or alphabet is not what the caller
expects.
"""

from __future__ import annotations

import heapq
import struct
import zlib

import numpy as np
import torch

MAGIC = b"LH"
VERSION = 1
MAX_LENGTH = 15  # longest code: lengths fit a nibble, the decode table has 2^15 entries
MAX_ALPHABET = 256
LANE = 4096  # symbols per lane: 16 bits of lane length per 4096 symbols
_HEAD = struct.Struct(">2sBHBIQQI")  # magic, version, alphabet, max length, lane, count, bits, crc
_CRC_AT = _HEAD.size - 4


def code_lengths(counts: np.ndarray, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol ``counts``, none longer than ``max_length``.

    A symbol with count 0 gets length 0 (no code); a single occurring symbol gets length 1.
    Where the optimal code would be longer than ``max_length``, the counts are halved (keeping
    every occurring symbol at least 1) until it fits, which costs little: only symbols far rarer
    than 2^-max_length are affected.

    Args:
        counts: int [A] occurrences of each symbol.
        max_length: The longest code allowed; ``A <= 2**max_length``.

    Returns:
        int64 [A] code lengths.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    weights = counts[used]
    while True:
        # Heap items: (weight, tie-break, the symbols below); each merge deepens its symbols.
        depth = np.zeros(used.size, dtype=np.int64)
        heap = [(int(w), i, [i]) for i, w in enumerate(weights)]
        heapq.heapify(heap)
        tie = len(heap)
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            merged = s1 + s2
            depth[merged] += 1
            heapq.heappush(heap, (w1 + w2, tie, merged))
            tie += 1
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = np.maximum(weights >> 1, 1)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (shorter codes first, ties by symbol): int64 [A]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.int64)
    code, previous = 0, 0
    for symbol in np.lexsort((np.arange(lengths.shape[0]), lengths)):
        length = int(lengths[symbol])
        if length == 0:
            continue
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def check_lengths(lengths: np.ndarray) -> None:
    """Raises unless ``lengths`` is a complete prefix code (or one symbol of length 1).

    Raises:
        ValueError: Lengths past :data:`MAX_LENGTH`, an over-subscribed code (not a prefix
            code) or an incomplete one (codes no encoder writes).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_LENGTH):
        raise ValueError(f"code lengths must lie in [0, {MAX_LENGTH}]")
    used = lengths[lengths > 0]
    if used.size == 0:
        return
    if used.size == 1:
        if used[0] != 1:
            raise ValueError("a single-symbol code must have length 1")
        return
    kraft = int((1 << (MAX_LENGTH - used)).sum())
    if kraft != 1 << MAX_LENGTH:
        what = "over-subscribed: not a prefix code" if kraft > 1 << MAX_LENGTH else "incomplete"
        raise ValueError(f"the code lengths are not a valid prefix code ({what})")


def entropy(symbols: torch.Tensor | np.ndarray, alphabet: int) -> float:
    """The empirical entropy of ``symbols`` in bits per symbol (0 for an empty stream)."""
    counts = np.bincount(_as_numpy(symbols).astype(np.int64), minlength=alphabet)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0


def encode(symbols: torch.Tensor | np.ndarray, alphabet: int, lane: int = LANE) -> torch.Tensor:
    """Huffman-codes ``symbols`` (any integer dtype, each in ``[0, alphabet)``) into one stream.

    Args:
        symbols: The symbols, flattened in C order.
        alphabet: How many distinct symbols there can be, 1 to 256.
        lane: Symbols per lane (see the module docstring), 1 to 4096.

    Returns:
        The coded stream, uint8 1-D.

    Raises:
        ValueError: ``alphabet`` or ``lane`` out of range, or a symbol outside ``[0, alphabet)``.
    """
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"`alphabet` must be in [1, {MAX_ALPHABET}], got {alphabet}")
    if not 1 <= lane <= LANE:
        raise ValueError(f"`lane` must be in [1, {LANE}], got {lane}")
    sym = _as_numpy(symbols).reshape(-1).astype(np.int64)
    if sym.size and (sym.min() < 0 or sym.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{sym.min()}, {sym.max()}]")
    lengths = code_lengths(np.bincount(sym, minlength=alphabet))
    codes = canonical_codes(lengths)
    lens, code = lengths[sym], codes[sym]
    ends = np.cumsum(lens)
    total = int(ends[-1]) if sym.size else 0
    starts = ends - lens
    lanes = starts[::lane]
    lane_bits = np.diff(lanes).astype(">u2")
    body = _pack_lengths(lengths) + lane_bits.tobytes() + _write_bits(starts, lens, code, total)
    head = _HEAD.pack(MAGIC, VERSION, alphabet, int(lengths.max()), lane, sym.size, total, 0)
    crc = zlib.crc32(body, zlib.crc32(head[:_CRC_AT]))
    stream = head[:_CRC_AT] + struct.pack(">I", crc) + body
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8)


def decode(
    stream: torch.Tensor, alphabet: int | None = None, count: int | None = None
) -> torch.Tensor:
    """Inverse of :func:`encode`: the symbols, uint8 1-D.

    Args:
        stream: A coded stream (uint8 1-D).
        alphabet: When given, the alphabet the stream must have been coded with.
        count: When given, the number of symbols the stream must hold.

    Raises:
        ValueError: A stream that is not exactly what :func:`encode` writes (truncated,
            corrupted, an invalid code), or whose alphabet or count differ from those given.
    """
    info = _parse(stream)
    if alphabet is not None and info.alphabet != alphabet:
        raise ValueError(
            f"coded stream has an alphabet of {info.alphabet} symbols, expected {alphabet}"
        )
    if count is not None and info.count != count:
        raise ValueError(f"coded stream holds {info.count} symbols, expected {count}")
    return torch.from_numpy(_decode_payload(info))


class StreamInfo:
    """A parsed, CRC-checked stream header (:func:`inspect`).

    Attributes:
        alphabet: The alphabet size.
        count: The number of symbols.
        bits: The payload's length in bits.
        lengths: int64 [alphabet] canonical code lengths.
        nbytes: The whole stream's size in bytes.
    """

    def __init__(
        self,
        alphabet: int,
        count: int,
        bits: int,
        lane: int,
        lengths: np.ndarray,
        lane_starts: np.ndarray,
        payload: np.ndarray,
        nbytes: int,
    ) -> None:
        self.alphabet, self.count, self.bits, self.lane = alphabet, count, bits, lane
        self.lengths, self.lane_starts, self.payload, self.nbytes = (
            lengths,
            lane_starts,
            payload,
            nbytes,
        )


def inspect(stream: torch.Tensor) -> StreamInfo:
    """The checked header of ``stream``, without decoding its payload.

    Raises:
        ValueError: As :func:`decode`, for everything but the payload's codes.
    """
    return _parse(stream)


# -- internals ----------------------------------------------------------------------------------


def _as_numpy(symbols: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(symbols, torch.Tensor):
        return symbols.detach().cpu().reshape(-1).numpy()
    return np.asarray(symbols).reshape(-1)


def _pack_lengths(lengths: np.ndarray) -> bytes:
    nib = lengths.astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8).tobytes()


def _write_bits(starts: np.ndarray, lens: np.ndarray, code: np.ndarray, total: int) -> bytes:
    """The codes at their bit offsets, MSB first, as ``ceil(total / 8)`` bytes.

    A code of at most 15 bits starting at bit ``o < 32`` of a 32-bit word lies within that word
    and the next: shifted into a 64-bit value, its high half goes to the one, its low half to
    the other. Codes never share a bit, so a word is the sum of its parts, which ``bincount``
    forms exactly in float64 (every sum < 2^32).
    """
    if total == 0:
        return b""
    words = (total + 31) // 32 + 1
    at = starts >> 5
    placed = code << (64 - (starts & 31) - lens)
    out = np.bincount(at, weights=(placed >> 32).astype(np.float64), minlength=words)
    out += np.bincount(at + 1, weights=(placed & 0xFFFFFFFF).astype(np.float64), minlength=words)
    return out.astype(np.uint32).astype(">u4").tobytes()[: (total + 7) // 8]


def _parse(stream: torch.Tensor) -> StreamInfo:
    if not isinstance(stream, torch.Tensor) or stream.dtype != torch.uint8 or stream.dim() != 1:
        raise ValueError("a coded stream must be a 1-D uint8 tensor")
    data = stream.detach().cpu().contiguous().numpy().tobytes()
    if len(data) < _HEAD.size:
        raise ValueError(f"coded stream truncated: {len(data)} bytes, shorter than its header")
    magic, version, alphabet, longest, lane, count, bits, crc = _HEAD.unpack_from(data)
    lanes = -(-count // lane) if lane else 0
    nlengths = (alphabet + 1) // 2
    want = _HEAD.size + nlengths + 2 * max(lanes - 1, 0) + (bits + 7) // 8
    # The CRC first: whatever byte is wrong, the error says the stream is corrupted (or cut).
    if zlib.crc32(data[_HEAD.size :], zlib.crc32(data[:_CRC_AT])) != crc:
        if len(data) != want:
            what = "truncated" if len(data) < want else "has trailing bytes"
            raise ValueError(
                f"coded stream {what} or corrupted: {len(data)} bytes, its header says {want}, "
                "and its CRC-32 does not match"
            )
        raise ValueError("coded stream corrupted: CRC-32 mismatch")
    if magic != MAGIC:
        raise ValueError("not a coded stream (bad magic)")
    if version != VERSION:
        raise ValueError(f"unsupported coded stream version {version} (this reads {VERSION})")
    if not 1 <= alphabet <= MAX_ALPHABET or not 1 <= lane <= LANE or longest > MAX_LENGTH:
        raise ValueError(
            f"corrupted coded stream header (alphabet {alphabet}, lane {lane}, "
            f"longest code {longest})"
        )
    if len(data) != want:
        what = "truncated" if len(data) < want else "has trailing bytes"
        raise ValueError(f"coded stream {what}: {len(data)} bytes, its header says {want}")
    raw = np.frombuffer(data, dtype=np.uint8, count=nlengths, offset=_HEAD.size)
    lengths = np.stack([raw >> 4, raw & 15], axis=1).reshape(-1)[:alphabet].astype(np.int64)
    check_lengths(lengths)
    if int(lengths.max(initial=0)) != longest:
        raise ValueError("corrupted coded stream header (longest code)")
    if count and not lengths.any():
        raise ValueError("coded stream holds symbols but no codes")
    at = _HEAD.size + nlengths
    lane_bits = np.frombuffer(data, dtype=">u2", count=max(lanes - 1, 0), offset=at)
    lane_starts = np.concatenate([[0], np.cumsum(lane_bits, dtype=np.int64)])[:lanes]
    if lanes and int(lane_starts[-1]) > bits:
        raise ValueError("coded stream corrupted: its lanes are longer than its payload")
    payload = np.frombuffer(data, dtype=np.uint8, offset=at + 2 * max(lanes - 1, 0))
    return StreamInfo(alphabet, count, bits, lane, lengths, lane_starts, payload, len(data))


def _decode_payload(info: StreamInfo) -> np.ndarray:
    count, lane = info.count, info.lane
    if count == 0:
        if info.bits:
            raise ValueError("coded stream corrupted: payload bits without symbols")
        return np.zeros(0, dtype=np.uint8)
    lengths = info.lengths
    longest = int(lengths.max())
    # table[peek of `longest` bits] -> symbol and code length; unassigned entries (only in a
    # single-symbol code) hold the sentinel symbol `alphabet` and length 0.
    sym_table = np.full(1 << longest, info.alphabet, dtype=np.uint16)
    len_table = np.zeros(1 << longest, dtype=np.int64)
    codes = canonical_codes(lengths)
    for symbol in np.flatnonzero(lengths):
        shift = longest - int(lengths[symbol])
        lo = int(codes[symbol]) << shift
        sym_table[lo : lo + (1 << shift)] = symbol
        len_table[lo : lo + (1 << shift)] = lengths[symbol]
    # A 32-bit big-endian window starting at every byte (zero-padded past the end), so a peek of
    # up to 15 bits at any bit offset is one gather and two shifts.
    padded = np.concatenate([info.payload, np.zeros(4, dtype=np.uint8)]).astype(np.int64)
    window = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    lanes = info.lane_starts.size
    last = count - (lanes - 1) * lane  # symbols in the last lane (the others hold `lane`)
    pos = info.lane_starts.copy()
    out = np.empty((min(lane, count), lanes), dtype=np.uint16)
    shift, mask = 32 - longest, (1 << longest) - 1
    active = pos
    try:
        for step in range(out.shape[0]):
            if step == last:
                active = pos[: lanes - 1]
            peek = ((window[active >> 3] << (active & 7)) >> shift) & mask
            out[step, : active.size] = sym_table[peek]
            active += len_table[peek]
    except IndexError:
        raise ValueError("coded stream corrupted: a code runs past the payload") from None
    symbols = out.T.reshape(-1)[: (lanes - 1) * lane] if lanes > 1 else np.zeros(0, np.uint16)
    symbols = np.concatenate([symbols, out[:last, lanes - 1]])
    if int(symbols.max()) >= info.alphabet:
        raise ValueError("coded stream corrupted: a code that is not in its code table")
    ends = np.append(info.lane_starts[1:], info.bits)
    if not np.array_equal(pos, ends):
        raise ValueError("coded stream corrupted: its lanes do not end where the header says")
    return symbols.astype(np.uint8)
