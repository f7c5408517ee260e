//! The broker's access registry across restarts on one data dir: users (hashes only on disk),
//! permissions and limits survive; the default user is created only on a blank node; a deleted vhost
//! stays deleted with its queues and permissions.

use mailroom_broker::access::{DefaultUser, LoopbackUsers, Permissions, UserTag, VhostLimits};
use mailroom_broker::{Broker, BrokerConfig, QueueOptions};
use std::path::{Path, PathBuf};

fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("mailroom-access").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open(dir: &Path, default_user: DefaultUser) -> Broker {
    Broker::open(BrokerConfig {
        data_dir: Some(dir.to_path_buf()),
        default_user,
        loopback_users: LoopbackUsers::None,
        ..BrokerConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_and_limits_survive_a_restart() {
    let dir = test_dir("restart");
    let admin = DefaultUser { name: "admin".into(), password: "s3cret".into() };
    {
        let broker = open(&dir, admin.clone());
        assert!(broker.authenticate("guest", "guest", true).is_err(), "no guest when a default user is given");
        let me = broker.authenticate("admin", "s3cret", false).unwrap();
        assert_eq!(me.tags, vec![UserTag::Administrator]);
        let ac = broker.access();
        ac.add_user("app", b"app-pw", vec![UserTag::Management]).unwrap();
        ac.set_permissions("app", "/", Permissions::new("^app\\.", ".*", ".*").unwrap()).unwrap();
        ac.set_vhost_limits("/", VhostLimits { max_connections: Some(5), max_queues: Some(9) });
    }
    let text = std::fs::read_to_string(dir.join("access.json")).unwrap();
    assert!(!text.contains("s3cret") && !text.contains("app-pw"), "only hashes on disk");

    // Another default user on restart changes nothing: the node is not blank.
    let broker = open(&dir, DefaultUser { name: "other".into(), password: "x".into() });
    assert!(broker.authenticate("other", "x", true).is_err());
    broker.authenticate("admin", "s3cret", true).unwrap();
    broker.authenticate("app", "app-pw", true).unwrap();
    let p = broker.access().permissions("app", "/").unwrap();
    assert_eq!(p.configure.as_str(), "^app\\.");
    assert_eq!(broker.access().vhost_limits("/").max_queues, Some(9));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_vhost_stays_deleted_with_its_queues_and_permissions() {
    let dir = test_dir("delete-vhost");
    {
        let broker = open(&dir, DefaultUser::guest());
        let v = broker.add_vhost("v");
        v.declare_queue("q", &QueueOptions { durable: true, ..Default::default() }, 1).unwrap();
        broker.access().set_permissions("guest", "v", Permissions::full()).unwrap();
        broker.delete_vhost("v").unwrap();
        assert!(broker.vhost("v").is_err());
        assert!(broker.access().permissions("guest", "v").is_none());
        assert!(broker.delete_vhost("v").is_err(), "NOT_FOUND the second time");
    }
    let broker = open(&dir, DefaultUser::guest());
    assert!(broker.vhost("v").is_err(), "the deletion is durable");
    // Re-created, it starts empty.
    let v = broker.add_vhost("v");
    assert!(v.queues().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
