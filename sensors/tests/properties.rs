//! Property tests: decoders and parsers never panic on any input; plans respect the limits.

use outpost_sensors::config::Framing;
use outpost_sensors::plan::{Limits, Span, plan};
use outpost_sensors::point::{Area, Codec, DataType, Order, Value};
use outpost_sensors::serial::framing::Framer;
use outpost_sensors::serial::{csv, jsonl, kv, nmea};
use proptest::prelude::*;

fn data_type() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::Bool),
        Just(DataType::U16),
        Just(DataType::I16),
        Just(DataType::U32),
        Just(DataType::I32),
        Just(DataType::U64),
        Just(DataType::I64),
        Just(DataType::F32),
        Just(DataType::F64),
        Just(DataType::String),
        Just(DataType::Bit),
    ]
}

fn order() -> impl Strategy<Value = Order> {
    prop_oneof![
        Just(Order::Abcd),
        Just(Order::Cdab),
        Just(Order::Badc),
        Just(Order::Dcba)
    ]
}

proptest! {
    #[test]
    fn register_decoding_never_panics(ty in data_type(), order in order(), regs in proptest::collection::vec(any::<u16>(), 0..8), len in 1u16..6, bit in 0u8..16, scale in -1e6f64..1e6) {
        let c = Codec { ty, order, length: len, bit, scale: if scale == 0.0 { 1.0 } else { scale }, offset: 0.0 };
        if let Ok(Value::Float(f)) = c.decode_registers(&regs) {
            prop_assert!(f.is_finite());
        }
    }

    #[test]
    fn integer_round_trip(v in any::<i32>(), order in order()) {
        let c = Codec::plain(DataType::I32, order);
        let regs = c.encode_registers(&Value::Int(i64::from(v))).unwrap();
        prop_assert_eq!(c.decode_registers(&regs).unwrap(), Value::Int(i64::from(v)));
    }

    #[test]
    fn encoding_never_panics(ty in data_type(), order in order(), x in any::<f64>(), scale in -1e3f64..1e3) {
        let c = Codec { ty, order, length: 2, bit: 0, scale: if scale == 0.0 { 1.0 } else { scale }, offset: 1.0 };
        let _ = c.encode_registers(&Value::Float(x));
        let _ = c.encode_registers(&Value::Text(x.to_string()));
    }

    #[test]
    fn parsers_never_panic(line in ".{0,200}", raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = nmea::parse(&line, false);
        let _ = nmea::parse(&format!("${line}"), true);
        let _ = kv::parse(&line);
        let _ = csv::parse(&line, &["a".to_string(), "b".to_string()], ',');
        let _ = jsonl::parse(&line);
        let mut f = Framer::new(Framing::Lines, 64);
        for frame in f.push(&raw) {
            let _ = frame;
        }
        let mut g = Framer::new(Framing::Fixed, 7);
        prop_assert_eq!(g.push(&raw).len(), raw.len() / 7);
    }

    #[test]
    fn plans_cover_every_point_within_limits(points in proptest::collection::vec((0u16..300, 1u16..5, 0u8..2), 1..60), gap in 0u16..20, max in 4u16..126) {
        let spans: Vec<Span> = points.iter().enumerate().map(|(i, (start, count, area))| Span {
            point: i,
            area: if *area == 0 { Area::Holding } else { Area::Input },
            start: *start,
            count: *count,
        }).collect();
        let limits = Limits { max_gap: gap, max_registers: max, max_bits: 2000 };
        let reads = plan(&spans, limits);
        let mut covered = vec![false; spans.len()];
        for r in &reads {
            prop_assert!(r.count <= max || r.points.len() == 1);
            for &p in &r.points {
                let s = &spans[p];
                prop_assert_eq!(s.area, r.area);
                prop_assert!(s.start >= r.start && s.start + s.count <= r.start + r.count);
                covered[p] = true;
            }
        }
        prop_assert!(covered.iter().all(|c| *c));
    }
}
