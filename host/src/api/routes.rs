//! The route table: every method and path of the management API with its
//! handler, in one list that builds the router and that the OpenAPI test
//! (`openapi_check`) compares with host/openapi.json. Requests no route
//! takes get the API's JSON error too (`extract::no_route`,
//! `extract::wrong_method`).

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, on};

use super::ApiState;
use super::{agent_ops, extract, feed, quota, users, vms};

/// An HTTP method the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    /// `GET` (axum also answers `HEAD`).
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl Verb {
    /// The method as OpenAPI writes it (`get`, `post`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// The routes added so far and the router they make.
pub struct Routes {
    router: Router<Arc<ApiState>>,
    table: Vec<(Verb, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<ApiState>>,
        T: 'static,
    {
        // Routes on one path merge into one method router.
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.table.push((verb, path));
        self
    }

    /// Every (method, path) served.
    pub fn table(&self) -> &[(Verb, &'static str)] {
        &self.table
    }

    /// The router (its state still to be given). A path no route serves
    /// is answered 404 `not_found`, a method its path does not serve 405
    /// `method_not_allowed` (with `Allow`), both as the API's JSON error.
    pub fn into_router(self) -> Router<Arc<ApiState>> {
        self.router
            .method_not_allowed_fallback(extract::wrong_method)
            .fallback(extract::no_route)
    }
}

/// Every route of the API.
pub fn routes() -> Routes {
    use Verb::{Delete, Get, Post, Put};
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    r.add(Get, "/v1/vms", vms::list)
        .add(Post, "/v1/vms", vms::create)
        .add(Get, "/v1/vms/{id}", vms::show)
        .add(Delete, "/v1/vms/{id}", vms::remove)
        .add(Get, "/v1/assignments", vms::assignments)
        .add(Put, "/v1/assignments/{user}", vms::assign)
        .add(Delete, "/v1/assignments/{user}", vms::unassign)
        .add(Get, "/v1/sessions", vms::sessions)
        .add(Get, "/v1/users", users::list)
        .add(Get, "/v1/users/{user}", quota::show)
        .add(Put, "/v1/users/{user}/quota", quota::set_quota)
        .add(Get, "/v1/users/{user}/versions", users::versions)
        .add(
            Delete,
            "/v1/users/{user}/versions/{v}",
            quota::delete_version,
        )
        .add(Post, "/v1/users/{user}/import", users::import)
        .add(Get, "/v1/users/{user}/versions/{v}/export", users::export)
        .add(Post, "/v1/users/{user}/rollback", users::rollback)
        .add(Post, "/v1/gc", users::gc)
        .add(Post, "/v1/scrub", users::scrub)
        .add(Get, "/v1/events", feed::events)
        .add(Get, "/metrics", feed::metrics)
        .add(Post, "/v1/vms/{id}/ua", agent_ops::deploy)
        .add(
            Post,
            "/v1/vms/{id}/ua/{name}/rollback",
            agent_ops::ua_rollback,
        )
        .add(Delete, "/v1/vms/{id}/ua/{name}", agent_ops::ua_delete)
        .add(
            Post,
            "/v1/vms/{id}/sessions/{session}/{action}",
            agent_ops::session_action,
        )
        .add(Post, "/v1/vms/{id}/monitor", agent_ops::monitor_grant)
        .add(Delete, "/v1/vms/{id}/monitor", agent_ops::monitor_revoke)
        .add(Get, "/v1/vms/{id}/status", agent_ops::status)
        .add(Post, "/v1/vms/{id}/ping", agent_ops::ping)
}
