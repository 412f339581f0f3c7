//! The DoPut decode path on arbitrary input: a sequence of IPC messages, each framed as
//! `[u16 header length][u16 body length][header][body]` (little-endian; the last one cut
//! short is taken as it is). `PutDecoder::decode` must answer every message with a batch,
//! nothing, or an error: never a panic reaching the caller, an abort, a hang or an
//! allocation the input does not pay for (libFuzzer's -rss_limit_mb, -timeout).
#![no_main]

use bytes::Bytes;
use flight_schema::decode::PutDecoder;
use libfuzzer_sys::fuzz_target;

fn messages(mut data: &[u8]) -> Vec<(Bytes, Bytes)> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let h = u16::from_le_bytes([data[0], data[1]]) as usize;
        let b = u16::from_le_bytes([data[2], data[3]]) as usize;
        data = &data[4..];
        let header = &data[..h.min(data.len())];
        data = &data[header.len()..];
        let body = &data[..b.min(data.len())];
        data = &data[body.len()..];
        out.push((Bytes::copy_from_slice(header), Bytes::copy_from_slice(body)));
    }
    out
}

fuzz_target!(
    init: {
        // Panics arrow's reader raises are caught inside `decode` (as in the server);
        // libfuzzer-sys's hook would abort on them first.
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
        let mut decoder = PutDecoder::default();
        for (header, body) in messages(data) {
            if let Ok(Some(d)) = decoder.decode(header, body) {
                // Touch the batch as the pipeline would.
                let _ = d.batch.get_array_memory_size();
            }
        }
    }
);
