# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Scatter reads of file byte ranges into an array, without the GIL (docs/formats/level1.md#direct-tod-reads).

Do not call this module directly: use :class:`utils.level1_hdf5.DirectReader`.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from posix.types cimport off_t
from posix.uio cimport iovec, preadv

cdef enum:
    MAX_IOV = 1024


cdef int64_t _preadv_all(int fd, iovec* iov, int cnt, int64_t pos, int64_t want, int* err) noexcept nogil:
    """``preadv`` until ``want`` bytes are in, retrying on EINTR and short reads; bytes read.
    ``err`` receives the ``errno`` of a failed call (0 at end of file)."""
    cdef int64_t done = 0
    cdef Py_ssize_t r, skip
    cdef int first = 0
    while done < want and first < cnt:
        r = preadv(fd, &iov[first], cnt - first, <off_t>(pos + done))
        if r < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return done
        if r == 0:
            return done
        done += r
        while first < cnt and r >= <Py_ssize_t>iov[first].iov_len:  # drop the iovecs filled
            r -= iov[first].iov_len
            first += 1
        if first < cnt and r > 0:  # part of one
            skip = r
            iov[first].iov_base = <void*>(<char*>iov[first].iov_base + skip)
            iov[first].iov_len -= skip
    return done


def read_runs(int fd, unsigned char[::1] dest, const int64_t[::1] file_pos, const int64_t[::1] dest_pos,
              const int64_t[::1] length, int[::1] err=None, int64_t max_gap=0):
    """Read run k, the file bytes ``[file_pos[k], file_pos[k] + length[k])``, into
    ``dest[dest_pos[k]:dest_pos[k] + length[k]]``.

    Runs must be sorted by ``file_pos``. Runs that follow each other in the file are read by one
    ``preadv`` (at most 1024 iovecs at a time); so are runs separated by at most ``max_gap`` bytes,
    whose gap is read into a scratch buffer and dropped: a box that cuts through chunks makes one
    run per row of each chunk, and one call for all of them costs less than a call per run
    (docs/formats/level1.md#direct-tod-reads). Returns the number of bytes read from the file,
    gaps included, or ``-1 - k`` when the read of the group starting at run k failed or came up
    short (end of file). ``err``, if given (one int), receives the ``errno`` of the failed read, or
    0 when it came up short.
    """
    cdef Py_ssize_t n = file_pos.shape[0], k = 0, start, cnt
    cdef int64_t pos, want, got, gap, total = 0, failed = -1
    cdef iovec iov[MAX_IOV]
    cdef char* base
    cdef char* scratch = NULL
    cdef int code = 0
    if n == 0:
        return 0
    if max_gap > 0:
        scratch = <char*>malloc(<size_t>max_gap)
        if scratch == NULL:
            max_gap = 0
    base = <char*>&dest[0]
    with nogil:
        while k < n:
            start = k
            pos = file_pos[k]
            cnt = 0
            want = 0
            while k < n and cnt < MAX_IOV - 1:
                gap = file_pos[k] - (pos + want)
                if gap > 0 and gap <= max_gap and cnt > 0:
                    iov[cnt].iov_base = <void*>scratch
                    iov[cnt].iov_len = <size_t>gap
                    want += gap
                    cnt += 1
                elif gap != 0 and cnt > 0:
                    break
                iov[cnt].iov_base = <void*>(base + dest_pos[k])
                iov[cnt].iov_len = <size_t>length[k]
                want += length[k]
                cnt += 1
                k += 1
            got = _preadv_all(fd, iov, <int>cnt, pos, want, &code)
            total += got
            if got != want:
                failed = start
                break
    free(scratch)
    if err is not None and err.shape[0] > 0:
        err[0] = code
    return total if failed < 0 else -1 - failed
