//! Method frames: parse a method payload, write a full method frame.

use amq_protocol::protocol::{gen_class, parse_class, AMQPClass};
use bytes::{BufMut, BytesMut};

use super::frame::{put_frame_header, FrameKind};
use super::nesting;
use super::writer::gen_into;
use super::{FRAME_END, FRAME_HEADER_LEN};

/// Why a method payload could not be turned into a [`super::Method`].
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodError {
    /// Fewer than 4 bytes: not even a class and method id.
    #[error("method payload shorter than class and method id")]
    Truncated,
    /// A class/method pair AMQP 0-9-1 does not define; the caller answers 503/540 as RabbitMQ does.
    #[error("unknown method {class_id}.{method_id}")]
    Unknown {
        /// Class id from the payload.
        class_id: u16,
        /// Method id from the payload.
        method_id: u16,
    },
    /// A known method whose arguments do not decode; the caller answers 502 SYNTAX_ERROR.
    #[error("malformed arguments for method {class_id}.{method_id}")]
    Malformed {
        /// Class id from the payload.
        class_id: u16,
        /// Method id from the payload.
        method_id: u16,
    },
}

/// Every (class, method) amq-protocol knows, so an unknown id is told apart from bad arguments.
fn is_known(class_id: u16, method_id: u16) -> bool {
    match class_id {
        10 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61 | 70 | 71),
        20 => matches!(method_id, 10 | 11 | 20 | 21 | 40 | 41),
        30 => matches!(method_id, 10 | 11),
        40 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        50 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        60 => matches!(
            method_id,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 50 | 60 | 70 | 71 | 72 | 80 | 90 | 100 | 110 | 111 | 120
        ),
        85 => matches!(method_id, 10 | 11),
        90 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    }
}

/// Parse a method frame payload; never panics, whatever the bytes.
///
/// Trailing bytes after the last argument are `Malformed`, as in amq-protocol's own frame
/// parser and RabbitMQ's exact-match decoder.
pub fn parse_method(payload: &[u8]) -> Result<AMQPClass, MethodError> {
    if payload.len() < 4 {
        return Err(MethodError::Truncated);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if !is_known(class_id, method_id) {
        return Err(MethodError::Unknown {
            class_id,
            method_id,
        });
    }
    let malformed = MethodError::Malformed {
        class_id,
        method_id,
    };
    nesting::check_method(class_id, method_id, &payload[4..]).map_err(|_| malformed)?;
    match parse_class(payload) {
        Ok((rest, method)) if rest.is_empty() => Ok(method),
        // Trailing bytes, or nom's Incomplete/Error/Failure.
        _ => Err(malformed),
    }
}

/// Append a full method frame.
///
/// Field-table values must not use `AMQPValue::ShortString`: amq-protocol writes it with a
/// type tag of `'_'` that no peer can read; build strings as `LongString`.
pub fn write_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) {
    let start = out.len();
    // Size patched below, once the arguments are written.
    put_frame_header(out, FrameKind::Method, channel, 0);
    match gen_into!(out, gen_class(method)) {
        Ok(()) => {
            let size = (out.len() - start - FRAME_HEADER_LEN) as u32;
            out[start + 3..start + FRAME_HEADER_LEN].copy_from_slice(&size.to_be_bytes());
            out.put_u8(FRAME_END);
        }
        Err(e) => {
            // Unreachable with a growable buffer and valid ShortStrings; dropping the frame
            // keeps the stream in sync, the error names the bug.
            out.truncate(start);
            tracing::error!(error = %e, ?method, "could not serialise method");
            debug_assert!(false, "could not serialise {method:?}: {e}");
        }
    }
}
