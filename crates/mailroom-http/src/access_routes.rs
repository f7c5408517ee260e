//! The access endpoints of RabbitMQ's management API (users, whoami, permissions, topic permissions,
//! vhost and user limits, vhost creation and deletion) over the broker's [`AccessControl`], and the
//! tag rules that gate every route (RabbitMQ's management permission levels).

use crate::api::{vhost_of, ApiError, ApiRequest, ApiResult, Reply};
use hyper::{Method, StatusCode};
use mailroom_broker::access::definitions::{PermissionDefinition, TopicPermissionDefinition, UserDefinition};
use mailroom_broker::access::limits::limit_from_rabbitmq;
use mailroom_broker::access::{
    AccessControl, ApiAction, ManagementRights, Permissions, TopicPermissions, UserBody, UserLimits, VhostLimits,
};
use mailroom_broker::Broker;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// What a route needs of the caller's tags (RabbitMQ: users, permissions, limits, vhost changes and
/// definitions are the administrator's; node data and other users' connections need monitoring; policy
/// changes need policymaker; everything else needs management).
pub fn required_action(method: &Method, rest: &[&str]) -> ApiAction {
    let write = method != Method::GET && method != Method::HEAD;
    match rest {
        ["whoami"] => ApiAction::UseApi,
        ["users", ..] | ["user-limits", ..] => ApiAction::ManageUsers,
        ["permissions", ..] | ["topic-permissions", ..] | ["vhost-limits", ..] => ApiAction::ManagePermissions,
        ["vhosts", _, "permissions" | "topic-permissions"] => ApiAction::ManagePermissions,
        // RabbitMQ 3.10 answers even GET of one vhost to administrators only ("Not administrator user").
        ["vhosts", _] => ApiAction::ManageVhosts,
        ["definitions", ..] => ApiAction::ManageUsers,
        ["policies", ..] | ["operator-policies", ..] | ["parameters", ..] if write => ApiAction::ManagePolicies,
        ["nodes", ..] => ApiAction::SeeNode,
        _ => ApiAction::UseApi,
    }
}

/// Refuses a request whose user's tags do not allow it (401 with RabbitMQ's reason, as its API does).
pub fn check_rights(rights: ManagementRights, method: &Method, rest: &[&str]) -> Result<(), ApiError> {
    let action = required_action(method, rest);
    if rights.allows(action) {
        return Ok(());
    }
    let reason = match action {
        _ if !rights.allows(ApiAction::UseApi) => "Not management user",
        ApiAction::SeeNode | ApiAction::SeeAllVhosts | ApiAction::SeeOthersConnections => "Not monitor user",
        _ => "Not administrator user",
    };
    Err(ApiError::new(StatusCode::UNAUTHORIZED, reason))
}

/// Answers the access routes; `None` for any other path.
pub fn route(broker: &Broker, req: &ApiRequest, rest: &[&str]) -> Option<ApiResult> {
    use Method as M;
    let ac = broker.access();
    let answer = match (&req.method, rest) {
        (&M::GET, ["whoami"]) => whoami(ac, &req.user),

        (&M::GET, ["users"]) => Ok(Reply::ok(Value::Array(ac.users().iter().map(user_json).collect()))),
        (&M::GET, ["users", name]) => ac.user(name).map(|u| Reply::ok(user_json(&u))).ok_or_else(|| no_user(name)),
        (&M::PUT, ["users", name]) => put_user(ac, name, req),
        (&M::DELETE, ["users", name]) => {
            ac.delete_user(name).map(|_| Reply::empty(StatusCode::NO_CONTENT)).map_err(|_| no_user(name))
        }
        (&M::GET, ["users", name, "permissions"]) => {
            known_user(ac, name).map(|_| permissions_where(ac, |u, _| u == *name))
        }
        (&M::GET, ["users", name, "topic-permissions"]) => {
            known_user(ac, name).map(|_| topic_permissions_where(ac, |u, _| u == *name))
        }
        (&M::GET, ["vhosts", vhost, "permissions"]) => {
            vhost_of(broker, vhost).map(|_| permissions_where(ac, |_, v| v == *vhost))
        }
        (&M::GET, ["vhosts", vhost, "topic-permissions"]) => {
            vhost_of(broker, vhost).map(|_| topic_permissions_where(ac, |_, v| v == *vhost))
        }

        (&M::GET, ["permissions"]) => Ok(permissions_where(ac, |_, _| true)),
        (&M::GET, ["permissions", vhost, user]) => match ac.permissions(user, vhost) {
            Some(p) => Ok(Reply::ok(permission_json(user, vhost, &p))),
            None => Err(ApiError::not_found(format!("no permissions for user '{user}' in vhost '{vhost}'"))),
        },
        (&M::PUT, ["permissions", vhost, user]) => put_permissions(broker, vhost, user, req),
        (&M::DELETE, ["permissions", vhost, user]) => {
            if ac.clear_permissions(user, vhost) {
                Ok(Reply::empty(StatusCode::NO_CONTENT))
            } else {
                Err(ApiError::not_found(format!("no permissions for user '{user}' in vhost '{vhost}'")))
            }
        }

        (&M::GET, ["topic-permissions"]) => Ok(topic_permissions_where(ac, |_, _| true)),
        (&M::GET, ["topic-permissions", vhost, user]) => {
            let found = topic_permissions_where(ac, |u, v| u == *user && v == *vhost);
            if found.body.as_array().is_some_and(Vec::is_empty) {
                Err(ApiError::not_found(format!("no topic permissions for user '{user}' in vhost '{vhost}'")))
            } else {
                Ok(found)
            }
        }
        (&M::PUT, ["topic-permissions", vhost, user]) => put_topic_permissions(broker, vhost, user, req),
        (&M::DELETE, ["topic-permissions", vhost, user]) => {
            if ac.clear_topic_permissions(user, vhost, None) {
                Ok(Reply::empty(StatusCode::NO_CONTENT))
            } else {
                Err(ApiError::not_found(format!("no topic permissions for user '{user}' in vhost '{vhost}'")))
            }
        }

        (&M::PUT, ["vhosts", name]) => {
            let created = broker.vhost(name).is_err();
            broker.add_vhost(name);
            if created {
                // As RabbitMQ: the creating user gets full permissions on the new vhost.
                let _ = ac.set_permissions(&req.user, name, Permissions::full());
            }
            Ok(Reply::created_or_updated(created))
        }
        (&M::DELETE, ["vhosts", name]) => {
            broker.delete_vhost(name).map(|_| Reply::empty(StatusCode::NO_CONTENT)).map_err(ApiError::from)
        }

        (&M::GET, ["vhost-limits"]) => Ok(vhost_limits_json(ac, None)),
        (&M::GET, ["vhost-limits", vhost]) => vhost_of(broker, vhost).map(|_| vhost_limits_json(ac, Some(vhost))),
        (&M::PUT, ["vhost-limits", vhost, name]) => set_vhost_limit(broker, vhost, name, Some(req)),
        (&M::DELETE, ["vhost-limits", vhost, name]) => set_vhost_limit(broker, vhost, name, None),

        (&M::GET, ["user-limits"]) => Ok(user_limits_json(ac, None)),
        (&M::GET, ["user-limits", user]) => known_user(ac, user).map(|_| user_limits_json(ac, Some(user))),
        (&M::PUT, ["user-limits", user, name]) => set_user_limit(ac, user, name, Some(req)),
        (&M::DELETE, ["user-limits", user, name]) => set_user_limit(ac, user, name, None),

        _ => return None,
    };
    Some(answer)
}

fn no_user(name: &str) -> ApiError {
    ApiError::not_found(format!("user '{name}' not found"))
}

/// RabbitMQ's answer to a permission PUT naming a missing vhost or user: 400 `vhost_or_user_not_found`.
fn vhost_and_user(broker: &Broker, vhost: &str, user: &str) -> Result<(), ApiError> {
    if broker.vhost(vhost).is_err() || broker.access().user(user).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    Ok(())
}

fn known_user(ac: &AccessControl, name: &str) -> Result<(), ApiError> {
    ac.user(name).map(|_| ()).ok_or_else(|| no_user(name))
}

fn whoami(ac: &AccessControl, name: &str) -> ApiResult {
    let user = ac.user(name).ok_or_else(|| no_user(name))?;
    let tags: Vec<&str> = user.tags.iter().map(|t| t.as_str()).collect();
    Ok(Reply::ok(json!({ "name": user.name, "tags": tags })))
}

/// A user as RabbitMQ 3.10's API lists it (`name`, `password_hash`, `hashing_algorithm`, `tags`, `limits`).
fn user_json(user: &mailroom_broker::access::User) -> Value {
    serde_json::to_value(UserDefinition::from_user(user)).unwrap_or(Value::Null)
}

fn put_user(ac: &AccessControl, name: &str, req: &ApiRequest) -> ApiResult {
    let body: UserBody = req.json()?;
    let mut user = body.to_user(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // A PUT replaces password and tags; the user's limits are set through /api/user-limits and stay.
    if let Some(old) = ac.user(name) {
        user.limits = old.limits;
    }
    Ok(Reply::created_or_updated(ac.put_user(user)))
}

fn permission_json(user: &str, vhost: &str, p: &Permissions) -> Value {
    serde_json::to_value(PermissionDefinition {
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        configure: p.configure.as_str().to_owned(),
        write: p.write.as_str().to_owned(),
        read: p.read.as_str().to_owned(),
    })
    .unwrap_or(Value::Null)
}

fn permissions_where(ac: &AccessControl, keep: impl Fn(&str, &str) -> bool) -> Reply {
    let all = ac.list_permissions();
    let items =
        all.iter().filter(|e| keep(&e.user, &e.vhost)).map(|e| permission_json(&e.user, &e.vhost, &e.permissions));
    Reply::ok(Value::Array(items.collect()))
}

fn topic_permissions_where(ac: &AccessControl, keep: impl Fn(&str, &str) -> bool) -> Reply {
    let all = ac.list_topic_permissions();
    let items = all.into_iter().filter(|e| keep(&e.user, &e.vhost)).map(|e| {
        serde_json::to_value(TopicPermissionDefinition {
            user: e.user,
            vhost: e.vhost,
            exchange: e.exchange,
            write: e.permissions.write,
            read: e.permissions.read,
        })
        .unwrap_or(Value::Null)
    });
    Reply::ok(Value::Array(items.collect()))
}

#[derive(Deserialize)]
struct PermissionBody {
    #[serde(default)]
    configure: String,
    #[serde(default)]
    write: String,
    #[serde(default)]
    read: String,
}

fn put_permissions(broker: &Broker, vhost: &str, user: &str, req: &ApiRequest) -> ApiResult {
    let ac = broker.access();
    vhost_and_user(broker, vhost, user)?;
    let body: PermissionBody = req.json()?;
    let p =
        Permissions::new(&body.configure, &body.write, &body.read).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let created = ac.permissions(user, vhost).is_none();
    ac.set_permissions(user, vhost, p).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Reply::created_or_updated(created))
}

#[derive(Deserialize)]
struct TopicPermissionBody {
    exchange: String,
    #[serde(default)]
    write: String,
    #[serde(default)]
    read: String,
}

fn put_topic_permissions(broker: &Broker, vhost: &str, user: &str, req: &ApiRequest) -> ApiResult {
    let ac = broker.access();
    vhost_and_user(broker, vhost, user)?;
    let body: TopicPermissionBody = req.json()?;
    let p = TopicPermissions::new(&body.write, &body.read).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let created =
        !ac.list_topic_permissions().iter().any(|e| e.user == user && e.vhost == vhost && e.exchange == body.exchange);
    ac.set_topic_permissions(user, vhost, &body.exchange, p).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Reply::created_or_updated(created))
}

fn limits_object(pairs: [(&str, Option<u64>); 2]) -> Value {
    let map: Map<String, Value> = pairs.into_iter().filter_map(|(k, v)| v.map(|n| (k.to_owned(), json!(n)))).collect();
    Value::Object(map)
}

fn vhost_limits_json(ac: &AccessControl, only: Option<&str>) -> Reply {
    let items = ac.list_vhost_limits().into_iter().filter(|(v, _)| only.is_none_or(|o| o == v)).map(|(v, l)| {
        json!({ "vhost": v, "value": limits_object([("max-connections", l.max_connections), ("max-queues", l.max_queues)]) })
    });
    Reply::ok(Value::Array(items.collect()))
}

fn user_limits_json(ac: &AccessControl, only: Option<&str>) -> Reply {
    let items = ac.users().into_iter().filter(|u| !u.limits.is_empty() && only.is_none_or(|o| o == u.name)).map(|u| {
        let l = u.limits;
        json!({ "user": u.name, "value": limits_object([("max-connections", l.max_connections), ("max-channels", l.max_channels)]) })
    });
    Reply::ok(Value::Array(items.collect()))
}

#[derive(Deserialize)]
struct LimitBody {
    value: Value,
}

/// The limit value of a PUT body (`{"value": n}`, negative = unlimited); `None` request = DELETE.
fn limit_value(req: Option<&ApiRequest>) -> Result<Option<u64>, ApiError> {
    let Some(req) = req else { return Ok(None) };
    let body: LimitBody = req.json()?;
    let n = match &body.value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let n = n.ok_or_else(|| ApiError::bad_request(format!("limit value must be an integer, got {}", body.value)))?;
    Ok(limit_from_rabbitmq(n))
}

fn set_vhost_limit(broker: &Broker, vhost: &str, name: &str, req: Option<&ApiRequest>) -> ApiResult {
    vhost_of(broker, vhost)?;
    let ac = broker.access();
    let mut limits: VhostLimits = ac.vhost_limits(vhost);
    let value = limit_value(req)?;
    match name {
        "max-connections" => limits.max_connections = value,
        "max-queues" => limits.max_queues = value,
        _ => return Err(ApiError::bad_request(format!("unknown vhost limit '{name}' (max-connections, max-queues)"))),
    }
    ac.set_vhost_limits(vhost, limits);
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

fn set_user_limit(ac: &AccessControl, user: &str, name: &str, req: Option<&ApiRequest>) -> ApiResult {
    let mut limits: UserLimits = ac.user(user).ok_or_else(|| no_user(user))?.limits;
    let value = limit_value(req)?;
    match name {
        "max-connections" => limits.max_connections = value,
        "max-channels" => limits.max_channels = value,
        _ => return Err(ApiError::bad_request(format!("unknown user limit '{name}' (max-connections, max-channels)"))),
    }
    ac.set_user_limits(user, limits).map_err(|_| no_user(user))?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// The authenticated caller, as RabbitMQ's management plugin limits it: vhost-scoped routes need
/// permissions in the vhost (monitoring users may read every vhost; administrators may do anything),
/// connections and channels are their owner's (monitoring users may see everyone's, administrators
/// close everyone's), and lists show only what the caller may see.
pub struct Caller<'a> {
    user: &'a str,
    rights: ManagementRights,
    /// The vhosts the user has permissions in (RabbitMQ's `list_login_vhosts`).
    login_vhosts: Vec<String>,
}

/// How a list is cut down for a caller who may not see all of it.
pub enum ListFilter {
    /// Items whose `vhost` field (or `name`, for the vhosts list) is one of these.
    Vhosts { field: &'static str, vhosts: Vec<String> },
    /// Items whose `user` field is this user (connections and channels).
    User(String),
}

impl ListFilter {
    /// Whether `item` stays in the list.
    pub fn keeps(&self, item: &Value) -> bool {
        match self {
            ListFilter::Vhosts { field, vhosts } => {
                item.get(*field).and_then(Value::as_str).is_some_and(|v| vhosts.iter().any(|x| x == v))
            }
            ListFilter::User(user) => item.get("user").and_then(Value::as_str) == Some(user.as_str()),
        }
    }
}

/// The vhost a path names, if any (`/api/queues/{vhost}/...`, `/api/parameters/{component}/{vhost}`).
fn vhost_in_path<'a>(rest: &[&'a str]) -> Option<&'a str> {
    match rest {
        ["exchanges" | "queues" | "bindings" | "policies" | "operator-policies" | "consumers" | "aliveness-test"
        | "definitions" | "vhost-limits" | "vhosts" | "permissions" | "topic-permissions", vhost, ..] => Some(vhost),
        ["parameters", _, vhost, ..] => Some(vhost),
        _ => None,
    }
}

impl<'a> Caller<'a> {
    /// The caller `user` with `rights`.
    pub fn new(broker: &Broker, user: &'a str, rights: ManagementRights) -> Self {
        let ac = broker.access();
        let login_vhosts = if rights.administrator {
            Vec::new()
        } else {
            broker.vhosts().iter().map(|v| v.name().to_owned()).filter(|v| ac.permissions(user, v).is_some()).collect()
        };
        Self { user, rights, login_vhosts }
    }

    fn may_enter(&self, vhost: &str) -> bool {
        self.rights.administrator || self.login_vhosts.iter().any(|v| v == vhost)
    }

    /// RabbitMQ's `is_authorized_vhost`: 401 "User not authorised to access virtual host" for a vhost the
    /// caller has no permissions in, reads included (RabbitMQ 3.10 answers so to monitoring users too:
    /// they see every vhost's objects in the lists, not through a vhost's own paths). A vhost that does
    /// not exist passes (the route answers 404, as RabbitMQ does).
    pub fn check_vhost(&self, broker: &Broker, rest: &[&str]) -> Result<(), ApiError> {
        let Some(vhost) = vhost_in_path(rest) else { return Ok(()) };
        if self.may_enter(vhost) || broker.vhost(vhost).is_err() {
            return Ok(());
        }
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "User not authorised to access virtual host"))
    }

    /// RabbitMQ's `is_authorized_user` for one connection or channel: reading another user's needs
    /// monitoring, closing another user's connection needs administrator; 401 "User not authorised to
    /// access object" otherwise.
    pub(crate) async fn check_owner(
        &self,
        broker: &Broker,
        server: &std::sync::Arc<crate::ServerInfo>,
        method: &Method,
        rest: &[&str],
    ) -> Result<(), ApiError> {
        let needed =
            if *method == Method::DELETE { ApiAction::CloseOthersConnections } else { ApiAction::SeeOthersConnections };
        if self.rights.allows(needed) {
            return Ok(());
        }
        let item = match rest {
            ["connections", name, ..] => crate::clients::get_connection(broker, server, name).await,
            ["channels", name] => crate::clients::get_channel(broker, server, name).await,
            _ => return Ok(()),
        };
        // A missing object is the route's 404 to give.
        let Ok(item) = item else { return Ok(()) };
        if item.body.get("user").and_then(Value::as_str) == Some(self.user) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "User not authorised to access object"))
        }
    }

    /// How a GET list must be cut for this caller (RabbitMQ's `filter_vhost` and `filter_conn_ch_list`),
    /// or None when the caller sees it whole.
    pub fn list_filter(&self, method: &Method, rest: &[&str]) -> Option<ListFilter> {
        if *method != Method::GET {
            return None;
        }
        let by_vhost = |field| ListFilter::Vhosts { field, vhosts: self.login_vhosts.clone() };
        match rest {
            ["connections"] | ["channels"] | ["vhosts", _, "connections" | "channels"] => {
                (!self.rights.allows(ApiAction::SeeOthersConnections)).then(|| ListFilter::User(self.user.to_owned()))
            }
            // `list_visible_vhosts`: monitoring users see every vhost's name.
            ["vhosts"] => (!self.rights.allows(ApiAction::SeeAllVhosts)).then(|| by_vhost("name")),
            // `filter_vhost`: everyone but administrators sees the objects of the vhosts they have
            // permissions in (RabbitMQ 3.10 cuts monitoring users' lists so too).
            ["queues"] | ["exchanges"] | ["bindings"] | ["policies"] | ["consumers"] => {
                (!self.rights.administrator).then(|| by_vhost("vhost"))
            }
            _ => None,
        }
    }
}
