//! The decoder allocates in proportion to the bytes it was given, never to a length
//! announced on the wire. A counting global allocator (per thread, so parallel tests do
//! not disturb each other) measures every decode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use outpost_mqtt::{Protocol, decode};

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts requested sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated while decoding `bytes` (buffer set up beforehand, result dropped after).
fn allocated_by_decode(bytes: &[u8], protocol: Protocol) -> usize {
    let mut buf = BytesMut::from(bytes);
    let before = ALLOCATED.with(Cell::get);
    let result = decode(&mut buf, protocol, usize::MAX);
    let after = ALLOCATED.with(Cell::get);
    drop(result);
    after - before
}

#[test]
fn announced_lengths_without_bytes_allocate_nothing() {
    let inputs: [&[u8]; 5] = [
        &[0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00],
        &[
            0x10, 0xFF, 0xFF, 0xFF, 0x7F, 0, 4, b'M', b'Q', b'T', b'T', 5,
        ],
        &[0x82, 0xFF, 0xFF, 0xFF, 0x7F, 0, 1, 0xFF, 0xFF, 0xFF, 0x7F],
        &[0x90, 0xFF, 0xFF, 0xFF, 0x7F, 0, 1],
        &[0xE0, 0x80, 0x80, 0x80],
    ];
    for bytes in inputs {
        for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
            assert_eq!(
                allocated_by_decode(bytes, protocol),
                0,
                "{bytes:?} {protocol:?}"
            );
        }
    }
}

#[test]
fn inner_lengths_beyond_the_packet_allocate_nothing() {
    // Complete packets whose strings, properties or payloads announce more than is there.
    let inputs: [&[u8]; 3] = [
        &[0x30, 3, 0xFF, 0xFF, b'a'],
        &[0x82, 7, 0, 1, 0xFF, 0xFF, 0xFF, 0x7F, 0],
        &[
            0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0xFF, 0x7F,
        ],
    ];
    for bytes in inputs {
        let mut buf = BytesMut::from(bytes);
        assert!(decode(&mut buf, Protocol::V5, usize::MAX).is_err());
        assert!(allocated_by_decode(bytes, Protocol::V5) <= 64, "{bytes:?}");
    }
}

#[test]
fn subscribe_with_many_filters_allocates_in_proportion_to_input() {
    // 2,000 one-character filters: 8,004 bytes of body.
    let mut body = vec![0u8, 1];
    for _ in 0..2000 {
        body.extend([0, 1, b'a', 1]);
    }
    let mut bytes = vec![0x82];
    let mut n = body.len();
    while n >= 0x80 {
        bytes.push((n as u8 & 0x7F) | 0x80);
        n >>= 7;
    }
    bytes.push(n as u8);
    bytes.extend(&body);
    let allocated = allocated_by_decode(&bytes, Protocol::V3_1_1);
    // Each filter owns a String and a Vec slot (doubling growth): bounded by a small
    // multiple of its four wire bytes.
    assert!(allocated > 0);
    assert!(
        allocated <= 32 * bytes.len(),
        "{allocated} bytes for {} input bytes",
        bytes.len()
    );
}
