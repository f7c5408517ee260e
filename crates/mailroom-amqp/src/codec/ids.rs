//! AMQP 0-9-1 class and method ids by name: the only place outside the codec's tables that spells them.

/// A method's (class id, method id), as `connection.close` and `channel.close` report the failing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodId {
    /// Class id.
    pub class: u16,
    /// Method id within the class.
    pub method: u16,
}

impl MethodId {
    /// The four payload bytes that start a method frame of this id.
    pub const fn prefix(self) -> [u8; 4] {
        let c = self.class.to_be_bytes();
        let m = self.method.to_be_bytes();
        [c[0], c[1], m[0], m[1]]
    }
}

/// Class ids.
pub mod class {
    /// `connection`.
    pub const CONNECTION: u16 = 10;
    /// `channel`.
    pub const CHANNEL: u16 = 20;
    /// `access` (obsolete, still answered).
    pub const ACCESS: u16 = 30;
    /// `exchange`.
    pub const EXCHANGE: u16 = 40;
    /// `queue`.
    pub const QUEUE: u16 = 50;
    /// `basic`: also the only content class.
    pub const BASIC: u16 = 60;
    /// `confirm` (RabbitMQ extension).
    pub const CONFIRM: u16 = 85;
    /// `tx`.
    pub const TX: u16 = 90;
}

/// `basic.qos`.
pub const BASIC_QOS: MethodId = MethodId { class: class::BASIC, method: 10 };
/// `basic.publish`.
pub const BASIC_PUBLISH: MethodId = MethodId { class: class::BASIC, method: 40 };
/// `basic.deliver`.
pub const BASIC_DELIVER: MethodId = MethodId { class: class::BASIC, method: 60 };
/// `basic.ack`.
pub const BASIC_ACK: MethodId = MethodId { class: class::BASIC, method: 80 };
/// `tx.commit`.
pub const TX_COMMIT: MethodId = MethodId { class: class::TX, method: 20 };

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{basic, tx, Method};

    #[test]
    fn ids_match_amq_protocol() {
        let cases = [
            (BASIC_QOS, Method::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 0, global: false }))),
            (BASIC_PUBLISH, Method::Basic(basic::AMQPMethod::Publish(basic::Publish::default()))),
            (BASIC_DELIVER, Method::Basic(basic::AMQPMethod::Deliver(basic::Deliver::default()))),
            (BASIC_ACK, Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 1, multiple: false }))),
            (TX_COMMIT, Method::Tx(tx::AMQPMethod::Commit(tx::Commit {}))),
        ];
        for (id, m) in cases {
            assert_eq!((id.class, id.method), (m.get_amqp_class_id(), m.get_amqp_method_id()), "{m:?}");
        }
        assert_eq!(BASIC_ACK.prefix(), [0, 60, 0, 80]);
    }
}
