//! The topics of one data directory: opening them all at start, creating
//! (explicitly or on first produce), deleting, and, for use without a
//! running broker, the cross-topic step of a queue fetch (dead letters go to
//! another topic before they are completed).
//!
//! Creating and deleting are one rename each, so a crash or a failure at any
//! point leaves the topic either fully there or not there at all: a new
//! topic's folder is assembled in `staging/` and renamed into `topics/` once
//! its `topic.toml` is durable; a deleted one is renamed into `trash/` once no
//! request is inside it (see [`crate::broker::gate`]), then removed in the
//! background.

use super::config::{MAX_NAME_LEN, TOPIC_CONFIG_FILE, TopicConfig, validate_name};
use super::topic::{DeliveryLimits, QueueFetch, Topic};
use crate::error::{Error, IoContext, Result};
use crate::storage::{DataDir, RecoveryMode};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Config of topics created without one.
    pub defaults: TopicConfig,
    /// Create unknown topics on first produce.
    pub auto_create: bool,
    /// How opening logs treats damage.
    pub recovery: RecoveryMode,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            defaults: TopicConfig::default(),
            auto_create: true,
            recovery: RecoveryMode::default(),
        }
    }
}

/// All topics of a locked data directory.
#[derive(Debug)]
pub struct Registry {
    data: DataDir,
    options: RegistryOptions,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
}

impl Registry {
    /// Opens every topic in `data`, recovering each.
    pub fn open(data: DataDir, options: RegistryOptions) -> Result<Registry> {
        data.clear_leftovers()?;
        let mut topics = BTreeMap::new();
        for name in data.topics()? {
            if validate_name("topic", &name).is_err() {
                tracing::warn!(folder = %data.topic_dir(&name).display(), "ignoring folder that is not a topic name");
                continue;
            }
            let dir = data.topic_dir(&name);
            let config = match TopicConfig::load(&**data.storage(), &dir)? {
                Some(config) => config,
                None => {
                    // A checkpoint that records journals was written by a
                    // topic, which had its config: starting on the defaults
                    // would silently change its fsync policy, segment size...
                    let by_topic = matches!(
                        crate::storage::checkpoint::Checkpoint::load(&**data.storage(), &dir),
                        Ok(Some(c)) if !c.journals.is_empty()
                    );
                    if by_topic {
                        let damage = crate::error::Corruption {
                            file: dir.join(TOPIC_CONFIG_FILE),
                            bytes: 0..0,
                            offsets: None,
                            detail: format!(
                                "topic {name} has lost its config file. Restore it, or start with \
                                 recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                                 to run the topic on the default config"
                            ),
                        };
                        if options.recovery == RecoveryMode::TolerateTornTail {
                            return Err(Error::corruption(damage));
                        }
                        tracing::error!(%damage, "running the topic on the default config");
                    } else {
                        tracing::warn!(topic = %name, "no {TOPIC_CONFIG_FILE}; using the default config");
                    }
                    // Written down, so the topic keeps this config and a
                    // later loss of the file is seen.
                    options.defaults.store(&**data.storage(), &dir)?;
                    options.defaults.clone()
                }
            };
            let topic = Topic::open(
                Arc::clone(data.storage()),
                &dir,
                &name,
                config,
                options.recovery,
            )?;
            topics.insert(name, Arc::new(topic));
        }
        Ok(Registry {
            data,
            options,
            topics: RwLock::new(topics),
        })
    }

    /// The data directory.
    pub fn data(&self) -> &DataDir {
        &self.data
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic `name` (not one being deleted).
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.read_topics()
            .get(name)
            .filter(|t| !t.is_retired())
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(format!("topic {name} does not exist")))
    }

    /// All topics, by name (not those being deleted).
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.read_topics()
            .values()
            .filter(|t| !t.is_retired())
            .cloned()
            .collect()
    }

    /// Creates `name` with `config`; fails if it exists. Waits for a delete
    /// of `name` under way, then creates a new, empty topic.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        validate_name("topic", name)?;
        config.validate()?;
        loop {
            let mut topics = self.write_topics();
            match topics.get(name) {
                Some(old) if old.is_retired() => {
                    let old = Arc::clone(old);
                    drop(topics);
                    old.gate().wait_settled();
                    continue;
                }
                Some(_) => return Err(Error::AlreadyExists(format!("topic {name} exists"))),
                None => {}
            }
            self.check_dead_letter_chain(&topics, name, &config)?;
            let topic = Arc::new(self.create_folder(name, config)?);
            topics.insert(name.to_owned(), Arc::clone(&topic));
            return Ok(topic);
        }
    }

    /// Refuses a config whose dead letters would come back to `name`: the
    /// topic itself, or a chain of dead-letter topics (existing ones with
    /// their configs, missing ones as an auto-create would make them) that
    /// loops back to it.
    fn check_dead_letter_chain(
        &self,
        topics: &BTreeMap<String, Arc<Topic>>,
        name: &str,
        config: &TopicConfig,
    ) -> Result<()> {
        let mut chain = vec![name.to_owned()];
        let mut next = config.dead_letter_topic(name);
        // A missing topic's default dead-letter name grows at every step, so
        // the walk ends at the longest name a topic can have.
        while next.len() <= MAX_NAME_LEN {
            if next == name {
                chain.push(next);
                return Err(Error::InvalidArgument(format!(
                    "dead_letter: dead letters of topic {name} would come back to it ({})",
                    chain.join(" → ")
                )));
            }
            if chain.contains(&next) {
                // A loop among other topics (made before loops were refused).
                return Ok(());
            }
            let after = match topics.get(&next).filter(|t| !t.is_retired()) {
                Some(t) => t.config().dead_letter_topic(&next),
                None => self.options.defaults.dead_letter_topic(&next),
            };
            chain.push(std::mem::replace(&mut next, after));
        }
        Ok(())
    }

    /// Makes the folder of a new topic (see the module docs) and opens it.
    /// On failure nothing of it is left where a start would find it.
    fn create_folder(&self, name: &str, config: TopicConfig) -> Result<Topic> {
        let storage = self.data.storage();
        let staging = self.data.staging_dir(name)?;
        let dir = self.data.topic_dir(name);
        let staged = config.store(&**storage, &staging).and_then(|()| {
            storage
                .rename(&staging, &dir)
                .ctx(|| format!("moving {} to {}", staging.display(), dir.display()))
        });
        if let Err(e) = staged {
            self.discard(&staging);
            return Err(e);
        }
        let topics_dir = dir.parent().unwrap_or(self.data.root());
        let opened = storage
            .sync_dir(topics_dir)
            .ctx(|| format!("syncing {}", topics_dir.display()))
            .and_then(|()| {
                Topic::open(
                    Arc::clone(storage),
                    &dir,
                    name,
                    config,
                    self.options.recovery,
                )
            });
        if opened.is_err() {
            match self.data.move_to_trash(&dir) {
                Ok(trash) => self.discard(&trash),
                Err(e) => tracing::warn!(topic = name, error = %e,
                    "could not take back the folder of a topic whose creation failed"),
            }
        }
        opened
    }

    /// Removes a folder of `staging/` or `trash/` now; a failure leaves it to
    /// the next start.
    fn discard(&self, dir: &std::path::Path) {
        if let Err(e) = DataDir::remove_leftover(&**self.data.storage(), dir) {
            tracing::warn!(error = %e, "leaving a folder to the next start");
        }
    }

    /// The topic `name`, created with the default config if missing and
    /// `auto_create` is on (or `force` is set, as for dead-letter topics).
    pub fn topic_or_create(&self, name: &str, force: bool) -> Result<Arc<Topic>> {
        match self.topic(name) {
            Err(Error::TopicNotFound(_)) if self.options.auto_create || force => {
                match self.create_topic(name, self.options.defaults.clone()) {
                    Err(Error::AlreadyExists(_)) => self.topic(name),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Deletes a topic with all its data and returns it (closed: every
    /// request on it gets `NOT_FOUND`). Requests inside it finish first; then
    /// its folder moves to `trash/` in one durable rename and is removed in
    /// the background. If the folder cannot be moved, the topic stays as it
    /// was and the error is returned.
    pub fn delete_topic(&self, name: &str) -> Result<Arc<Topic>> {
        let topic = self.topic(name)?;
        if !topic.gate().close() {
            // Another delete of it is under way.
            return Err(Error::TopicNotFound(format!("topic {name} does not exist")));
        }
        let moved = self.data.move_to_trash(topic.dir());
        if moved.is_err() && self.data.storage().exists(topic.dir()) {
            topic.gate().reopen();
            return moved.map(|_| topic);
        }
        {
            let mut topics = self.write_topics();
            if topics.get(name).is_some_and(|t| Arc::ptr_eq(t, &topic)) {
                topics.remove(name);
            }
        }
        topic.gate().finish();
        let trash = moved?;
        let storage = Arc::clone(self.data.storage());
        let removal = std::thread::Builder::new()
            .name("spool-trash".into())
            .spawn({
                let trash = trash.clone();
                move || {
                    if let Err(e) = DataDir::remove_leftover(&*storage, &trash) {
                        tracing::warn!(error = %e, "leaving a deleted topic's folder to the next start");
                    }
                }
            });
        if removal.is_err() {
            self.discard(&trash);
        }
        Ok(topic)
    }

    /// Compacts one topic, or every topic; returns each topic's figures.
    pub fn compact(
        &self,
        topic: Option<&str>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<(String, crate::storage::compact::CompactStats)>> {
        let topics = match topic {
            Some(name) => vec![self.topic(name)?],
            None => self.topics(),
        };
        let now = crate::storage::log::now_ms();
        let mut out = Vec::with_capacity(topics.len());
        for t in topics {
            let stats = match t.compact(now, progress) {
                // Deleted meanwhile: nothing left to compact.
                Err(Error::TopicNotFound(_)) if topic.is_none() => continue,
                other => other?,
            };
            out.push((t.name().to_owned(), stats));
        }
        Ok(out)
    }

    /// Appends dead letters to the topic `name` (created if missing) and
    /// makes them durable. A dead-letter topic deleted meanwhile is created
    /// again: the letters must be stored somewhere before their source
    /// completes them.
    fn hand_off(&self, name: &str, messages: &[crate::storage::NewMessage]) -> Result<Arc<Topic>> {
        let mut attempts = 0;
        loop {
            let dlq = self.topic_or_create(name, true)?;
            let stored = dlq.produce(messages).and_then(|_| {
                if dlq.config().log.fsync == crate::storage::FsyncPolicy::Always {
                    Ok(())
                } else {
                    dlq.sync_log()
                }
            });
            match stored {
                Err(Error::TopicNotFound(_)) if attempts < 3 => attempts += 1,
                other => return other.map(|()| dlq),
            }
        }
    }

    /// A queue fetch with its dead letters handed to the dead-letter topic
    /// (durably) before they are completed in the group. This appends to the
    /// dead-letter topic directly, for use without a running broker (tools,
    /// tests); [`crate::broker::Broker`] hands dead letters to that topic's
    /// writer instead.
    pub fn fetch_queue(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        max: usize,
        max_bytes: usize,
        now: u64,
    ) -> Result<QueueFetch> {
        self.fetch_queue_within(
            topic,
            group,
            member,
            DeliveryLimits::new(max, max_bytes),
            now,
        )
    }

    /// [`Registry::fetch_queue`] for a delivery of at most `limits`: a message
    /// too large for it goes to the dead-letter topic at once (see
    /// [`Topic::fetch_queue_within`]).
    pub fn fetch_queue_within(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        now: u64,
    ) -> Result<QueueFetch> {
        let source = self.topic(topic)?;
        let fetch = source.fetch_queue_within(group, member, limits, now)?;
        if !fetch.dead_letters.is_empty() {
            let messages: Vec<_> = fetch
                .dead_letters
                .iter()
                .map(|d| d.message.clone())
                .collect();
            let dlq = self.hand_off(&source.config().dead_letter_topic(topic), &messages)?;
            let offsets: Vec<_> = fetch.dead_letters.iter().map(|d| d.offset).collect();
            source.complete_dead_letters(group, &offsets)?;
            tracing::warn!(
                topic,
                group,
                count = offsets.len(),
                dlq = dlq.name(),
                "dead-lettered messages"
            );
        }
        Ok(fetch)
    }
}
