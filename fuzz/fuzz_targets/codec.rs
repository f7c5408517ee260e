//! Any bytes through every entry point of the codec: none may panic or overflow the stack.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mailroom_amqp::codec;

fuzz_target!(|data: &[u8]| {
    let _ = codec::parse_method(data);
    let _ = codec::parse_content_header(Bytes::copy_from_slice(data));
    let _ = codec::parse_sasl_response("PLAIN", data);
    let _ = codec::parse_sasl_response("AMQPLAIN", data);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec::split_frame(&mut buf, 131_072) {
        match frame.kind {
            codec::FrameKind::Method => {
                if let Ok(m) = codec::parse_method(&frame.payload) {
                    let mut out = BytesMut::new();
                    codec::write_method(&mut out, frame.channel, &m);
                }
            }
            codec::FrameKind::Header => {
                if let Ok(h) = codec::parse_content_header(frame.payload) {
                    let _ = codec::encode_properties(&h.properties);
                }
            }
            _ => {}
        }
    }
});
