//! Property tests: no input makes the codec panic, and framing survives any read chunking.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

/// Method ids the parser knows, so random arguments reach the argument decoders.
const KNOWN: &[(u16, u16)] = &[
    (10, 10),
    (10, 11),
    (10, 20),
    (10, 21),
    (10, 30),
    (10, 31),
    (10, 40),
    (10, 41),
    (10, 50),
    (10, 51),
    (10, 60),
    (10, 61),
    (10, 70),
    (10, 71),
    (20, 10),
    (20, 11),
    (20, 20),
    (20, 21),
    (20, 40),
    (20, 41),
    (30, 10),
    (30, 11),
    (40, 10),
    (40, 11),
    (40, 20),
    (40, 21),
    (40, 30),
    (40, 31),
    (40, 40),
    (40, 51),
    (50, 10),
    (50, 11),
    (50, 20),
    (50, 21),
    (50, 30),
    (50, 31),
    (50, 40),
    (50, 41),
    (50, 50),
    (50, 51),
    (60, 10),
    (60, 11),
    (60, 20),
    (60, 21),
    (60, 30),
    (60, 31),
    (60, 40),
    (60, 50),
    (60, 60),
    (60, 70),
    (60, 71),
    (60, 72),
    (60, 80),
    (60, 90),
    (60, 100),
    (60, 110),
    (60, 111),
    (60, 120),
    (85, 10),
    (85, 11),
    (90, 10),
    (90, 11),
    (90, 20),
    (90, 21),
    (90, 30),
    (90, 31),
];

/// Bytes biased towards what field tables are made of: type tags, small lengths, zeros.
fn table_ish() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(&b"tbBsUuIilLfdDSATFxV"[..]),
        3 => 0u8..8,
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn split_frame_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048), max in 0u32..10_000) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Keep splitting until it needs more or errors, as the connection loop does.
        while let Ok(Some(_)) = split_frame(&mut buf, max) {}
    }

    #[test]
    fn parse_method_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse_method(&bytes);
    }

    #[test]
    fn parse_method_with_known_ids_never_panics(
        id in prop::sample::select(KNOWN),
        args in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), table_ish()],
    ) {
        let mut p = id.0.to_be_bytes().to_vec();
        p.extend_from_slice(&id.1.to_be_bytes());
        p.extend_from_slice(&args);
        match parse_method(&p) {
            Err(MethodError::Unknown { .. }) | Err(MethodError::Truncated) => prop_assert!(false, "known id reported unknown"),
            // Anything parsed writes back to a canonical form that is a fixed point. Bytes,
            // not values, are compared: a random float may be NaN, and NaN != NaN.
            Ok(m) => {
                let mut out = BytesMut::new();
                write_method(&mut out, 1, &m);
                let f = split_frame(&mut out, u32::MAX).unwrap().unwrap();
                let again = parse_method(&f.payload).unwrap();
                let mut out2 = BytesMut::new();
                write_method(&mut out2, 1, &again);
                let f2 = split_frame(&mut out2, u32::MAX).unwrap().unwrap();
                prop_assert_eq!(f.payload, f2.payload);
            }
            Err(MethodError::Malformed { .. }) => {}
        }
    }

    #[test]
    fn parse_content_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse_content_header(Bytes::from(bytes));
    }

    #[test]
    fn parse_content_header_with_valid_prefix_never_panics(
        flags in any::<u16>(),
        props in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), table_ish()],
    ) {
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        p.extend_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(&props);
        if let Ok(h) = parse_content_header(Bytes::from(p.clone())) {
            prop_assert_eq!(&h.raw_properties[..], &p[12..]);
            // A decoded header re-encodes to a canonical form that is a fixed point (bytes
            // compared, as floats may be NaN).
            let raw = encode_properties(&h.properties);
            let mut again = p[..12].to_vec();
            again.extend_from_slice(&raw);
            let reparsed = parse_content_header(Bytes::from(again)).unwrap();
            prop_assert_eq!(encode_properties(&reparsed.properties), raw);
        }
    }

    #[test]
    fn sasl_never_panics(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), table_ish()]) {
        let _ = parse_sasl_response("PLAIN", &bytes);
        let _ = parse_sasl_response("AMQPLAIN", &bytes);
    }

    #[test]
    fn framing_survives_any_chunking(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
        cuts in prop::collection::vec(1usize..64, 1..200),
    ) {
        let mut wire = BytesMut::new();
        for (i, b) in bodies.iter().enumerate() {
            write_body(&mut wire, i as u16, b, FRAME_MIN_SIZE);
            write_heartbeat(&mut wire);
        }
        let wire = wire.freeze();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cuts = cuts.into_iter().cycle();
        while pos < wire.len() {
            let n = cuts.next().unwrap().min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(f) = split_frame(&mut buf, FRAME_MIN_SIZE).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        let expected: Vec<(FrameKind, u16, Vec<u8>)> = bodies
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                let body = (!b.is_empty()).then(|| (FrameKind::Body, i as u16, b.clone()));
                body.into_iter().chain(std::iter::once((FrameKind::Heartbeat, 0, Vec::new())))
            })
            .collect();
        let got: Vec<_> = got.into_iter().map(|f| (f.kind, f.channel, f.payload.to_vec())).collect();
        prop_assert_eq!(got, expected);
    }
}
