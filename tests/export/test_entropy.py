import struct
import time
import zlib

import numpy as np
import pytest
import torch

from lightning_compress.export import entropy
from lightning_compress.export.entropy import (
    LANE,
    MAX_LENGTH,
    canonical_codes,
    check_lengths,
    code_lengths,
    decode,
    encode,
)

HEAD = entropy._HEAD  # the fixed header, to craft streams with a valid CRC


def skewed(n, alphabet=16, spread=2.0, seed=0):
    """Indices as k-means with linear initialisation leaves them on a bell-shaped weight."""
    p = np.exp(-np.abs(np.arange(alphabet) - alphabet / 2) / spread)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(alphabet, size=n, p=p / p.sum()).astype(np.uint8))


def resigned(data: bytes) -> torch.Tensor:
    """``data`` with its CRC recomputed, so only the stream's other checks can catch it."""
    crc = zlib.crc32(data[HEAD.size :], zlib.crc32(data[: HEAD.size - 4]))
    fixed = data[: HEAD.size - 4] + struct.pack(">I", crc) + data[HEAD.size :]
    return torch.frombuffer(bytearray(fixed), dtype=torch.uint8)


def header(stream):
    return list(HEAD.unpack_from(stream.numpy().tobytes()))


@pytest.mark.parametrize("n", [0, 1, 7, LANE - 1, LANE, LANE + 1, 3 * LANE + 17])
def test_round_trip_across_lane_boundaries(n):
    symbols = skewed(n)
    stream = encode(symbols, 16)
    assert stream.dtype == torch.uint8 and stream.dim() == 1
    out = decode(stream, alphabet=16, count=n)
    assert out.dtype == torch.uint8 and torch.equal(out, symbols)


def test_round_trip_of_a_single_symbol_a_full_byte_alphabet_and_unused_symbols():
    one = torch.full((300,), 5, dtype=torch.uint8)
    stream = encode(one, 16)
    assert torch.equal(decode(stream), one)
    assert stream.numel() * 8 < 300 * 1.2 + 8 * 64  # one bit per symbol plus the header
    wide = torch.randint(0, 256, (20_000,), dtype=torch.uint8)
    assert torch.equal(decode(encode(wide, 256), alphabet=256), wide)
    sparse_use = torch.tensor([0, 200, 200, 3, 200, 0], dtype=torch.uint8)
    assert torch.equal(decode(encode(sparse_use, 256)), sparse_use)
    lane = 5  # a small lane exercises many lanes
    assert torch.equal(decode(encode(skewed(1003), 16, lane=lane)), skewed(1003))


def test_coded_size_is_within_a_tenth_of_a_bit_of_the_entropy():
    for spread, n in ((1.0, 50_000), (2.0, 50_000), (4.0, 200_000)):
        symbols = skewed(n, spread=spread)
        stream = encode(symbols, 16)
        h = entropy.entropy(symbols, 16)
        head_bits = 8 * (HEAD.size + 8 + 2 * (n // LANE))
        coded = (stream.numel() * 8 - head_bits) / n
        assert h < coded <= h + 0.1, (spread, h, coded)
        assert h < 3.9  # skewed: the code is worth more than the 4 bits it replaces


def test_code_lengths_are_optimal_and_limited_to_fifteen_bits():
    assert code_lengths(np.array([5, 0, 1, 1, 3])).tolist() == [1, 0, 3, 3, 2]
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])  # a Huffman tree as deep as the alphabet
    counts = np.array(fib[::-1], dtype=np.int64)
    assert code_lengths(counts, max_length=64).max() == 29  # unlimited
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_LENGTH and (lengths > 0).all()
    check_lengths(lengths)
    symbols = torch.from_numpy(np.repeat(np.arange(30), counts // 1000 + 1).astype(np.uint8))
    assert torch.equal(decode(encode(symbols, 30)), symbols)
    codes = canonical_codes(np.array([2, 1, 3, 3]))
    assert codes.tolist() == [0b10, 0b0, 0b110, 0b111]


def test_a_layer_of_four_and_a_half_million_indices_codes_in_well_under_seconds():
    # 4096 x 11008 at 10% density; the budget is loose for a shared 2-core machine.
    symbols = skewed(4_508_877)
    start = time.perf_counter()
    stream = encode(symbols, 16)
    encoded = time.perf_counter() - start
    start = time.perf_counter()
    out = decode(stream, alphabet=16, count=symbols.numel())
    decoded = time.perf_counter() - start
    assert torch.equal(out, symbols)
    assert encoded < 3.0 and decoded < 3.0, (encoded, decoded)


@pytest.fixture
def stream():
    return encode(skewed(2 * LANE + 100), 16)


def test_every_truncation_and_trailing_bytes_are_rejected(stream):
    data = stream.numpy().tobytes()
    for cut in [*range(0, HEAD.size + 12), len(data) // 2, len(data) - 1]:
        with pytest.raises(ValueError, match=r"truncated|bad magic|corrupted"):
            decode(torch.frombuffer(bytearray(data[:cut]) or bytearray(1), dtype=torch.uint8))
    with pytest.raises(ValueError, match="trailing bytes"):
        decode(torch.frombuffer(bytearray(data + b"\0"), dtype=torch.uint8))


def test_every_flipped_byte_is_rejected(stream):
    data = bytearray(stream.numpy().tobytes())
    for offset in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        with pytest.raises(ValueError, match=r"CRC|corrupted|bad magic|version|truncated|bytes"):
            decode(torch.frombuffer(flipped, dtype=torch.uint8))


def test_lengths_that_are_not_a_prefix_code_are_rejected_even_with_a_valid_crc(stream):
    data = bytearray(stream.numpy().tobytes())
    data[HEAD.size] = 0x11  # the first two symbols get 1-bit codes: over-subscribed
    with pytest.raises(ValueError, match="not a valid prefix code"):
        decode(resigned(bytes(data)))
    data = bytearray(stream.numpy().tobytes())
    lengths = np.frombuffer(bytes(data[HEAD.size : HEAD.size + 8]), dtype=np.uint8)
    last = int(np.flatnonzero(lengths)[-1])
    data[HEAD.size + last] = lengths[last] & 0xF0  # drops a code: incomplete
    with pytest.raises(ValueError, match=r"not a valid prefix code|incomplete"):
        decode(resigned(bytes(data)))
    with pytest.raises(ValueError, match="must lie in"):
        check_lengths(np.array([16, 1]))


def test_payloads_that_do_not_decode_are_rejected_even_with_a_valid_crc():
    one = encode(torch.zeros(40, dtype=torch.uint8), 4)  # code "0"; a 1 bit is no code
    data = bytearray(one.numpy().tobytes())
    data[-1] |= 0x01
    with pytest.raises(ValueError, match="not in its code table"):
        decode(resigned(bytes(data)))
    stream = encode(skewed(3 * LANE), 16)
    fields = header(stream)
    data = bytearray(stream.numpy().tobytes())
    at = HEAD.size + 8  # the first lane's length, one bit off
    (bits,) = struct.unpack_from(">H", data, at)
    struct.pack_into(">H", data, at, bits + 1)
    with pytest.raises(ValueError, match=r"lanes do not end|past the payload"):
        decode(resigned(bytes(data)))
    fields[5] += 1  # one symbol more than coded
    raw = bytearray(stream.numpy().tobytes())
    raw[: HEAD.size] = HEAD.pack(*fields)
    with pytest.raises(ValueError, match=r"truncated|corrupted"):
        decode(resigned(bytes(raw)))


def test_expectations_and_arguments_are_checked(stream):
    with pytest.raises(ValueError, match="holds 8292 symbols, expected 8000"):
        decode(stream, count=8000)
    with pytest.raises(ValueError, match="alphabet of 16 symbols, expected 8"):
        decode(stream, alphabet=8)
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, 4\)"):
        encode(torch.tensor([0, 4], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="`alphabet` must be in"):
        encode(torch.zeros(3, dtype=torch.uint8), 257)
    with pytest.raises(ValueError, match="1-D uint8"):
        decode(stream.to(torch.int8))
    assert entropy.entropy(torch.zeros(0, dtype=torch.uint8), 4) == 0.0
    assert entropy.entropy(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(2.0)
