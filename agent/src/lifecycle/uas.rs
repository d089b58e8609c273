//! The host's UVE-2 requests about UAs and their sessions: suspend and
//! resume a session, delete a UA (logging out the sessions it serves when
//! forced); the UA store itself for deploy, update and rollback.

use uve_protocol::message::{ErrorCode, WireError};
use uve_protocol::names::{SessionId, UaName};

use super::Lifecycle;
use crate::stores::ua::UaStore;

impl Lifecycle {
    /// The deployed UAs (deploy, update, rollback).
    pub fn uas(&self) -> &UaStore {
        &self.uas
    }

    /// Freezes (`freeze`) or thaws the processes of `session`.
    pub async fn suspend(&self, session: &str, freeze: bool) -> Result<(), WireError> {
        if self.table.session(session).is_none() {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("no session {session}"),
            ));
        }
        self.supervisor
            .set_suspended(session, freeze)
            .await
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e))
    }

    /// Deletes UA `name`: refused while sessions use it, unless `force`
    /// (then they are logged out first). Returns the sessions stopped.
    pub async fn delete_ua(&self, name: &UaName, force: bool) -> Result<Vec<SessionId>, WireError> {
        let users = self.table.sessions_using(name);
        if !users.is_empty() && !force {
            let list: Vec<&str> = users.iter().map(SessionId::as_str).collect();
            return Err(WireError::new(
                ErrorCode::UaInUse,
                format!("UA {name} serves sessions {}", list.join(", ")),
            ));
        }
        for s in &users {
            if let Err(e) = self.logout(s).await {
                tracing::error!(session = %s, "stopping session for UA delete: {e}");
            }
        }
        self.uas.remove(name).await?;
        Ok(users)
    }
}
