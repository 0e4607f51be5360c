//! Reading the whole log for an investigation (a timeline, what a user saw): the one place both the
//! CLI (`cairn investigate`, with a progress line) and the API operations (`Patient/{id}/$timeline`,
//! `$seen`) build them from, so the two always agree.

use crate::seen::{SeenAccess, SeenBuilder, Viewer};
use crate::timeline::{TimelineBuilder, TimelineEntry};
use cairn_events::{Event, Timestamp};
use cairn_log::{EventLog, LogError, Record};

/// Told after every batch read: records read so far, and how many were kept.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Reads every record of every event topic in order, partition by partition, up to each partition's
/// end as it was when the scan began (a live log keeps growing: the answer is the log at that moment);
/// `visit` says whether it kept the record. Gives the runtime back its thread after every batch (an
/// embedded log's reads do not wait, and a scan must not starve the server it runs in). Returns how
/// many records were read.
pub async fn scan_log(
    log: &dyn EventLog,
    visit: &mut (dyn FnMut(&Record) -> bool + Send),
    progress: Progress<'_>,
) -> Result<u64, LogError> {
    let mut ends = Vec::new();
    for topic in cairn_events::topics::ALL {
        let Ok(partitions) = log.partitions(topic) else { continue };
        for partition in 0..partitions {
            ends.push((topic, partition, log.end_offset(topic, partition).await?));
        }
    }
    let (mut scanned, mut kept) = (0u64, 0u64);
    for (topic, partition, end) in ends {
        let mut next = 0;
        while next < end {
            let batch = log.read(topic, partition, next, 4096).await?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for r in batch.iter().filter(|r| r.offset < end) {
                scanned += 1;
                kept += u64::from(visit(r));
            }
            progress(scanned, kept);
            YieldNow(false).await;
        }
    }
    Ok(scanned)
}

/// Returns `Pending` once (waking itself at once), so the executor runs other tasks in between.
struct YieldNow(bool);

impl std::future::Future for YieldNow {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Whether `needle` occurs in `haystack` (a cheap test before parsing an event).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The timeline of `Patient/<patient_id>` in `[from, to]`, and how many records were read.
pub async fn timeline(
    log: &dyn EventLog,
    patient_id: &str,
    from: Timestamp,
    to: Timestamp,
    progress: Progress<'_>,
) -> Result<(Vec<TimelineEntry>, u64), LogError> {
    let mut builder = TimelineBuilder::new(&format!("Patient/{patient_id}"), from, to);
    let scanned = scan_log(
        log,
        &mut |r| {
            // The patient's own events name its id; sign-ins and token grants (cairn.auth) never do
            // and are kept in case an access used them.
            if r.topic != cairn_events::topics::AUTH && !contains(&r.value, patient_id.as_bytes()) {
                return false;
            }
            let Ok(event) = Event::from_canonical_bytes(&r.value) else { return false };
            builder.add(&event, format!("{}:{}:{}", r.topic, r.partition, r.offset));
            true
        },
        progress,
    )
    .await?;
    Ok((builder.finish(), scanned))
}

/// What `viewer` was sent in `[from, to]`: two passes (the viewer's accesses, then the versions).
pub async fn seen(
    log: &dyn EventLog,
    viewer: Viewer,
    from: Timestamp,
    to: Timestamp,
    progress: Progress<'_>,
) -> Result<Vec<SeenAccess>, LogError> {
    let mut builder = SeenBuilder::new(viewer, from, to);
    scan_log(
        log,
        &mut |r| {
            if r.topic != cairn_events::topics::ACCESS {
                return false;
            }
            let Ok(event) = Event::from_canonical_bytes(&r.value) else { return false };
            builder.add_access(&event, format!("{}:{}:{}", r.topic, r.partition, r.offset));
            true
        },
        &mut *progress,
    )
    .await?;
    if builder.wants_anything() {
        scan_log(
            log,
            &mut |r| {
                let Ok(event) = Event::from_canonical_bytes(&r.value) else { return false };
                builder.add_source(&event);
                true
            },
            progress,
        )
        .await?;
    }
    Ok(builder.finish())
}
