//! The run's spawned tasks, awaited together to one deadline.

use tokio::{task::JoinHandle, time::Instant};

/// Each task's result in order, awaited until `deadline` at the latest; `None` for one that had
/// not ended by then (or panicked).
pub async fn join_by<T>(handles: Vec<JoinHandle<T>>, deadline: Instant) -> Vec<Option<T>> {
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(tokio::time::timeout_at(deadline, h).await.ok().and_then(Result::ok));
    }
    results
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_not_ended_by_the_deadline_is_none_and_the_others_keep_their_place() {
        let quick = tokio::spawn(async { 1 });
        let stuck = tokio::spawn(std::future::pending::<i32>());
        let late = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            3
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            join_by(vec![quick, stuck, late], deadline).await,
            [Some(1), None, Some(3)]
        );
    }
}
