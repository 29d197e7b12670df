"""Text mode's kernels: SentencePiece BPE encoding, the layout steps and piece decoding.

``bpe_encode`` gives the ids SentencePiece's BPE model gives (``bpe_model.cc``: start from single
characters, then repeatedly merge the adjacent pair whose concatenation is a piece with the best score,
the leftmost on a tie; a character that is no piece becomes byte-fallback tokens). It relies on two facts
about the vocabulary that ``ctxmix.data.text`` checks before using it: no piece holds "▁" after its
first character, and every character of every piece is itself a piece. So merges never cross the start
of a "▁" or a character outside the vocabulary, and each word (a "▁" and the characters up to the next
one) is merged on its own: the global order of SentencePiece's agenda, restricted to one word, is the
same best-score-leftmost order. Tests compare the ids with SentencePiece's on every shared text file.

Short words (the usual case) find their best pair by a scan; a word longer than ``SCAN_MAX_SYMBOLS``
uses a heap, so that a long run without spaces costs O(n log n), not O(n^2).
"""

from __future__ import annotations

import numpy as np
from numba import njit

NO_PIECE = -1  # char_ids / pair_ids entry: no such piece
SCAN_MAX_SYMBOLS = 48  # words up to this many characters are merged by scanning
LITERAL_SPACE_PIECE = 0x2581  # "▁" in the text: coded as its UTF-8 bytes (it would read back as a space)
NO_RANK = 1 << 30  # rank of a pair that merges into nothing
WORD_CACHE_BITS = 14  # bpe_encode's word cache: 16384 slots, indexed by the top bits of a word's hash
WORD_CACHE_SLOTS = 1 << WORD_CACHE_BITS
COPY_WIDTH = 8  # pieces_decode copies a plain piece of up to this many bytes in one fixed-width move
WORD_KEY_BYTES = 16  # words up to this long are cached (their bytes are the key)
FNV_PRIME, GOLDEN = 0x100000001B3, 0x9E3779B97F4A7C15  # 64-bit FNV prime, 2^64 / golden ratio: the cache's mix


@njit(cache=True, inline="always")
def _rank_of(pair_ids, ranks, left, right):
    merged = pair_ids[left, right]
    return ranks[merged] if merged >= 0 else NO_RANK


@njit(cache=True, inline="always")
def _merge_scan(symbols, n, pair_ids, ranks, pair_ranks):
    """Merge ``symbols[:n]`` in place (best rank first, leftmost on a tie); returns the new length.
    ``pair_ranks`` is scratch: the rank of each adjacent pair, updated around each merge."""
    for i in range(n - 1):
        pair_ranks[i] = _rank_of(pair_ids, ranks, symbols[i], symbols[i + 1])
    while n > 1:
        best = NO_RANK
        at = -1
        for i in range(n - 1):
            if pair_ranks[i] < best:  # strict: the leftmost pair wins a tie
                best = pair_ranks[i]
                at = i
        if at < 0:
            return n
        symbols[at] = pair_ids[symbols[at], symbols[at + 1]]
        for i in range(at + 1, n - 1):
            symbols[i] = symbols[i + 1]
            pair_ranks[i] = pair_ranks[i + 1]
        n -= 1
        if at > 0:
            pair_ranks[at - 1] = _rank_of(pair_ids, ranks, symbols[at - 1], symbols[at])
        if at < n - 1:
            pair_ranks[at] = _rank_of(pair_ids, ranks, symbols[at], symbols[at + 1])
    return n


@njit(cache=True)
def _heap_push(heap, size, item):
    heap[size] = item
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= heap[i]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _heap_pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and heap[left + 1] < heap[left]:
            child = left + 1
        if heap[i] <= heap[child]:
            break
        heap[i], heap[child] = heap[child], heap[i]
        i = child
    return top, size


@njit(cache=True)
def _merge_heap(symbols, n, pair_ids, ranks):
    """As ``_merge_scan`` for long words: a min-heap of (rank, left position) over a linked list."""
    nxt = np.empty(n, np.int64)
    prv = np.empty(n, np.int64)
    alive = np.ones(n, np.bool_)
    for i in range(n):
        nxt[i] = i + 1 if i + 1 < n else -1
        prv[i] = i - 1
    heap = np.empty(4 * n + 4, np.int64)  # each merge pushes at most 2 pairs
    size = 0
    for i in range(n - 1):
        rank = _rank_of(pair_ids, ranks, symbols[i], symbols[i + 1])
        if rank < NO_RANK:
            size = _heap_push(heap, size, (rank << 32) | i)
    while size > 0:
        item, size = _heap_pop(heap, size)
        rank = item >> 32
        left = item & 0xFFFFFFFF
        right = nxt[left]
        # A stale entry: the pair at ``left`` changed since it was pushed (a new pair has another rank,
        # since every piece has its own score; an identical pair is the same merge).
        if not alive[left] or right < 0 or _rank_of(pair_ids, ranks, symbols[left], symbols[right]) != rank:
            continue
        symbols[left] = pair_ids[symbols[left], symbols[right]]
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        if prv[left] >= 0:
            before = prv[left]
            rank = _rank_of(pair_ids, ranks, symbols[before], symbols[left])
            if rank < NO_RANK:
                size = _heap_push(heap, size, (rank << 32) | before)
        if nxt[left] >= 0:
            rank = _rank_of(pair_ids, ranks, symbols[left], symbols[nxt[left]])
            if rank < NO_RANK:
                size = _heap_push(heap, size, (rank << 32) | left)
    m = 0
    i = 0
    while i >= 0:
        symbols[m] = symbols[i]
        m += 1
        i = nxt[i]
    return m


@njit(cache=True, inline="always")
def _flush(symbols, n, pair_ids, ranks, pair_ranks, out, n_out):
    if n == 0:
        return n_out
    if n == 1:
        out[n_out] = symbols[0]
        return n_out + 1
    if n <= SCAN_MAX_SYMBOLS:
        m = _merge_scan(symbols, n, pair_ids, ranks, pair_ranks)
    else:
        m = _merge_heap(symbols, n, pair_ids, ranks)
    for i in range(m):
        out[n_out + i] = symbols[i]
    return n_out + m


@njit(cache=True, inline="always")
def _utf8_at(text, i):
    """(code point, width in bytes) of the UTF-8 character starting at ``text[i]`` (valid UTF-8)."""
    lead = np.int64(text[i])
    if lead < 0x80:
        return lead, 1
    if lead < 0xE0:
        return ((lead & 0x1F) << 6) | (np.int64(text[i + 1]) & 0x3F), 2
    if lead < 0xF0:
        return ((lead & 0x0F) << 12) | ((np.int64(text[i + 1]) & 0x3F) << 6) | (np.int64(text[i + 2]) & 0x3F), 3
    return (((lead & 0x07) << 18) | ((np.int64(text[i + 1]) & 0x3F) << 12)
            | ((np.int64(text[i + 2]) & 0x3F) << 6) | (np.int64(text[i + 3]) & 0x3F)), 4


@njit(cache=True, nogil=True)
def bpe_encode(text, char_ids, space_id, pair_ids, ranks, byte_ids):
    """Token ids int64[N] of ``text`` uint8[B] (valid UTF-8), spaces read as "▁".

    ``char_ids`` int32[0x110000]: the piece id of each single character (NO_PIECE: none);
    ``space_id``: the "▁" piece; ``pair_ids`` int[V, V]: the piece two adjacent pieces merge into
    (NO_PIECE: none); ``ranks`` int64[V]: merge priority (0 = best, from the pieces' scores);
    ``byte_ids`` int64[256]: byte-fallback tokens. A literal U+2581 is coded as its three byte tokens.
    """
    n_bytes = text.shape[0]
    out = np.empty(n_bytes, np.int64)  # every character gives at most one token per byte
    symbols = np.empty(n_bytes + 1, np.int64)
    pair_ranks = np.empty(SCAN_MAX_SYMBOLS, np.int64)
    # Word cache: a word's tokens depend only on its bytes, and most words recur. A word of up to
    # WORD_KEY_BYTES bytes is its own key, packed in two int64 (exact: no hash is trusted), in a direct-mapped
    # row of 32 bytes: (bytes 0..7, bytes 8..15, length | token count << 8, where its tokens start in
    # ``out``). A hit copies the tokens of the word's first occurrence. One row per word, not five arrays
    # and a byte compare against the first occurrence far back in the text: 15% faster (measured).
    cache = np.zeros((WORD_CACHE_SLOTS, 4), np.int64)  # length 0: an empty row
    n_out = 0
    n_sym = 0
    word_start = 0
    i = 0
    while i <= n_bytes:
        if i < n_bytes:
            code, width = _utf8_at(text, i)
            piece = space_id if code == 0x20 else char_ids[code]
            normal = code != 0x20 and piece >= 0 and code != LITERAL_SPACE_PIECE
        else:  # the end: flush the last word
            code, width, piece, normal = -1, 1, -1, False
        if not normal and n_sym > 0:  # a word ends here: a "▁", a character with no piece, or the end
            if n_sym == 1:
                out[n_out] = symbols[0]
                n_out += 1
            else:
                length = i - word_start
                if length > WORD_KEY_BYTES:  # (rare: merged every time)
                    n_out = _flush(symbols, n_sym, pair_ids, ranks, pair_ranks, out, n_out)
                else:
                    low = np.int64(0)
                    high = np.int64(0)
                    for k in range(min(length, 8)):
                        low |= np.int64(text[word_start + k]) << (8 * k)
                    for k in range(8, length):
                        high |= np.int64(text[word_start + k]) << (8 * (k - 8))
                    mixed = np.uint64(low) ^ (np.uint64(high) * np.uint64(FNV_PRIME)) ^ np.uint64(length)
                    slot = np.int64((mixed * np.uint64(GOLDEN)) >> np.uint64(64 - WORD_CACHE_BITS))
                    if (cache[slot, 2] & 0xFF) == length and cache[slot, 0] == low and cache[slot, 1] == high:
                        first = cache[slot, 3]
                        count = cache[slot, 2] >> 8
                        for k in range(count):
                            out[n_out + k] = out[first + k]
                        n_out += count
                    else:
                        before = n_out
                        n_out = _flush(symbols, n_sym, pair_ids, ranks, pair_ranks, out, n_out)
                        cache[slot, 0] = low
                        cache[slot, 1] = high
                        cache[slot, 2] = length | ((n_out - before) << 8)
                        cache[slot, 3] = before
            n_sym = 0
        if i == n_bytes:
            break
        if normal:
            if n_sym == 0:
                word_start = i
            symbols[n_sym] = piece
            n_sym += 1
        elif code == 0x20:  # a word starts at each "▁"
            word_start = i
            symbols[0] = piece
            n_sym = 1
        else:  # no piece for it (or a literal "▁"): its bytes, and no merge across it
            for k in range(width):
                out[n_out] = byte_ids[text[i + k]]
                n_out += 1
        i += width
    return out[:n_out].copy()


@njit(cache=True, nogil=True)
def pieces_decode(tokens, piece_bytes, piece_offsets, line_space, crlf, previous, counts):
    """The bytes uint8[] that ``tokens`` int64[N] (no BOS) stand for, and in ``counts`` int64[N] (when not
    empty) how many of them each token gave: pieces concatenated (``piece_bytes`` uint8[], token v =
    piece_bytes[piece_offsets[v]:piece_offsets[v + 1]]), then, with ``line_space``, the one space after
    each "\n", "\r", "\t" dropped, then with ``crlf`` each "\n" written as "\r\n". ``previous``: the
    byte before the first token's (-1 at the start of a text; a span decoded on its own passes the
    last byte before it). Same result as text.py's byte-string steps, in one pass; a piece without
    those three bytes after a byte that is none of them is copied as it is (most tokens: the
    byte-by-byte rules cost three times as much)."""
    n_pieces = piece_offsets.shape[0] - 1
    plain = np.ones(n_pieces, np.bool_)  # no "\n", "\r", "\t" in the piece
    for v in range(n_pieces):
        for k in range(piece_offsets[v], piece_offsets[v + 1]):
            if _is_line_break(piece_bytes[k]):
                plain[v] = False
    # A plain piece of up to COPY_WIDTH bytes is copied as COPY_WIDTH bytes whatever its length (the
    # next piece overwrites the rest): a loop of 1..8 rounds mispredicts its exit at most tokens.
    padded = np.zeros(piece_bytes.shape[0] + COPY_WIDTH, np.uint8)
    padded[: piece_bytes.shape[0]] = piece_bytes
    total = 0
    for t in range(tokens.shape[0]):
        total += piece_offsets[tokens[t] + 1] - piece_offsets[tokens[t]]
    out = np.empty((2 * total if crlf else total) + COPY_WIDTH, np.uint8)
    counted = counts.shape[0] > 0
    n = 0
    # ``previous`` is the last byte of the transformed text before dropping (the regex sees that text)
    for t in range(tokens.shape[0]):
        v = tokens[t]
        first, end = piece_offsets[v], piece_offsets[v + 1]
        began = n
        if plain[v] and not (line_space and _is_line_break(previous)):
            if end - first <= COPY_WIDTH:
                for k in range(COPY_WIDTH):
                    out[n + k] = padded[first + k]
                n += end - first
            else:
                for k in range(first, end):
                    out[n] = piece_bytes[k]
                    n += 1
            if end > first:
                previous = piece_bytes[end - 1]
        else:
            for k in range(first, end):
                b = piece_bytes[k]
                drop = line_space and b == 0x20 and _is_line_break(previous)
                previous = -1 if drop else b  # the regex consumes the pair: "\n  " keeps its second space
                if drop:
                    continue
                if crlf and b == 0x0A:
                    out[n] = 0x0D
                    n += 1
                out[n] = b
                n += 1
        if counted:
            counts[t] = n - began
    return out[:n]


@njit(cache=True, nogil=True)
def decode_mismatch(tokens, piece_bytes, piece_offsets, line_space, crlf, previous, expected, counts):
    """``pieces_decode`` compared with ``expected`` uint8[]: -1 when the bytes are equal, else the offset
    of the first difference (the shorter length when one is a prefix of the other). Fills ``counts``."""
    decoded = pieces_decode(tokens, piece_bytes, piece_offsets, line_space, crlf, previous, counts)
    n = min(decoded.shape[0], expected.shape[0])
    for i in range(n):
        if decoded[i] != expected[i]:
            return i
    return -1 if decoded.shape[0] == expected.shape[0] else n


@njit(cache=True)
def _is_line_break(b):
    return b == 0x0A or b == 0x0D or b == 0x09


@njit(cache=True, nogil=True)
def line_end_counts(data):
    """(CRLF pairs, CRs, LFs) in ``data`` uint8[], in one pass (text mode's CRLF flag needs all three)."""
    pairs = 0
    crs = 0
    lfs = 0
    n = data.shape[0]
    for i in range(n):  # (one pass: 0.13 ms on lcet10.txt, three bytes.count took 0.69 ms)
        cr = data[i] == 0x0D
        crs += cr
        lfs += data[i] == 0x0A
        pairs += cr and i + 1 < n and data[i + 1] == 0x0A
    return pairs, crs, lfs


@njit(cache=True, nogil=True)
def layout_apply(data, start, end, crlf, line_space, starts_word):
    """The text ``bpe_encode`` reads for ``data[start:end]`` (uint8; text mode's steps 2 and 3): with
    ``crlf`` each CR before an LF dropped; with ``line_space`` a space inserted after each "\n", "\r",
    "\t" of that text that is followed by a character ``c`` with ``starts_word[c]`` (the space counts 0
    bytes).

    The space is written before that character, in its span: a span cut right after a "\n" then starts
    with the " " its first word needs for the "▁word" pieces, and the spans' texts joined are the whole
    file's. ``previous`` is the last byte of the text with CRs dropped (the text the line-space rule
    reads), so a dropped CR is neither a line break nor a following character."""
    n = data.shape[0]
    previous = -1
    if start > 0:
        previous = data[start - 1]
        if crlf and previous == 0x0D and start < n and data[start] == 0x0A:  # a dropped CR: the byte before it
            previous = data[start - 2] if start > 1 else -1
    out = np.empty(2 * (end - start), np.uint8)
    m = 0
    for i in range(start, end):
        b = data[i]
        if crlf and b == 0x0D and i + 1 < n and data[i + 1] == 0x0A:
            continue
        if line_space and _is_line_break(previous):
            code, _width = _utf8_at(data, i)
            if starts_word[code]:
                out[m] = 0x20
                m += 1
        out[m] = b
        m += 1
        previous = b
    return out[:m].copy()


@njit(cache=True, nogil=True)
def merge_space_runs(ids, space_id, run_ids, min_run, max_run):
    """Each run of >= ``min_run`` ``space_id`` tokens as run tokens (``run_ids[k]``: k spaces) of up to
    ``max_run`` spaces each, a leftover single space kept as ``space_id``."""
    n = ids.shape[0]
    out = np.empty(n, np.int64)
    m = 0
    i = 0
    while i < n:
        if ids[i] != space_id:
            out[m] = ids[i]
            m += 1
            i += 1
            continue
        j = i
        while j < n and ids[j] == space_id:
            j += 1
        remaining = j - i
        if remaining < min_run:
            for _ in range(remaining):
                out[m] = space_id
                m += 1
        else:
            while remaining >= min_run:
                k = min(remaining, max_run)
                out[m] = run_ids[k]
                m += 1
                remaining -= k
            if remaining == 1:
                out[m] = space_id
                m += 1
        i = j
    return out[:m].copy()
