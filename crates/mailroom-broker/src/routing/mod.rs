//! Routing rules of the built-in exchange types that need more than key equality:
//! topic pattern matching ([`topic`]) and headers-exchange bindings ([`headers`]).
//!
//! Both follow RabbitMQ 3.10 (`rabbit_exchange_type_topic.erl`,
//! `rabbit_exchange_type_headers.erl`), checked against a live RabbitMQ 3.10.

pub mod headers;
pub mod topic;
