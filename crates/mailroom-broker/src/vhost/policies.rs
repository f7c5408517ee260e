//! The vhost's policies: kept, saved, and applied to the queues whose names they match.

use super::{read, write, VHost};
use crate::error::{BrokerError, Result};
use crate::policy::{self as policies, Policy};
use crate::queue::Queue;
use crate::store::{Change, PolicyDef};
use std::sync::Arc;

impl VHost {
    /// The policies, sorted by name.
    pub fn policies(&self) -> Vec<Policy> {
        let mut all = read(&self.policies).clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<Policy> {
        read(&self.policies).iter().find(|p| p.name == name).cloned()
    }

    /// Creates or replaces a policy and applies it to the matching existing queues (saved with the definitions).
    /// A failure to save it is logged (and raises the disk alarm); the next save that succeeds writes it.
    pub fn set_policy(&self, policy: Policy) {
        let seq = {
            let mut all = write(&self.policies);
            all.retain(|p| p.name != policy.name);
            let def = PolicyDef {
                vhost: self.name.clone(),
                name: policy.name.clone(),
                pattern: policy.pattern.clone(),
                apply_to: policy.apply_to.as_str().to_owned(),
                priority: policy.priority,
                definition: policy.definition.clone(),
            };
            all.push(policy);
            self.durability.as_ref().map(|d| (d, d.record(Change::PutPolicy(def))))
        };
        self.reapply_policies();
        if let Some(Err(e)) = seq.map(|(d, seq)| d.commit(seq)) {
            tracing::error!(vhost = %self.name, error = %e, "cannot save a policy");
        }
    }

    /// Deletes a policy (404 if missing); queues it applied to fall back to the next matching one or none.
    pub fn delete_policy(&self, name: &str) -> Result<()> {
        let seq = {
            let mut all = write(&self.policies);
            let before = all.len();
            all.retain(|p| p.name != name);
            if all.len() == before {
                return Err(BrokerError::not_found(format!("no policy '{name}' in vhost '{}'", self.name)));
            }
            self.durability
                .as_ref()
                .map(|d| (d, d.record(Change::DeletePolicy { vhost: self.name.clone(), name: name.to_owned() })))
        };
        self.reapply_policies();
        match seq {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }

    fn reapply_policies(&self) {
        for q in self.queues() {
            self.apply_policy_to(&q);
        }
    }

    pub(super) fn apply_policy_to(&self, queue: &Arc<Queue>) {
        // The read guard is held while applying, so a concurrent set/delete cannot be overwritten by a
        // stale choice (its write waits, then its reapply runs after this one).
        let all = read(&self.policies);
        queue.apply_policy(policies::select(&all, queue.name()));
    }
}
