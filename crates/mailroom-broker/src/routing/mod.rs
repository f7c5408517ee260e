//! Routing rules of the built-in exchange types that need more than key equality:
//! topic pattern matching ([`topic`]), headers-exchange bindings ([`headers`]) and the consistent-hash
//! exchange ([`consistent_hash`], RabbitMQ's `rabbitmq_consistent_hash_exchange` plugin built in).
//!
//! Both follow RabbitMQ 3.10 (`rabbit_exchange_type_topic.erl`,
//! `rabbit_exchange_type_headers.erl`), checked against a live RabbitMQ 3.10.

pub mod consistent_hash;
pub mod headers;
pub mod topic;
