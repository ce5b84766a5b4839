//! The topics of one data directory: opening them all at start, creating
//! (explicitly or on first produce), deleting, and the cross-topic step of a
//! queue fetch (dead letters go to another topic before they are completed).

use super::config::{TOPIC_CONFIG_FILE, TopicConfig, validate_name};
use super::topic::{QueueFetch, Topic};
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
                    let checkpoint = crate::storage::checkpoint::path(&dir);
                    if data.storage().exists(&checkpoint) {
                        // The topic was created with a config (the checkpoint
                        // comes after it): starting on the defaults would
                        // silently change its fsync policy, segment size...
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

    /// The topic `name`.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.read_topics()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("topic {name} does not exist")))
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.read_topics().values().cloned().collect()
    }

    /// Creates `name` with `config`; fails if it exists.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        validate_name("topic", name)?;
        config.validate()?;
        let mut topics = self.write_topics();
        if topics.contains_key(name) {
            return Err(Error::AlreadyExists(format!("topic {name} exists")));
        }
        let dir = self.data.topic_dir(name);
        let storage = self.data.storage();
        storage
            .create_dir_all(&dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        config.store(&**storage, &dir)?;
        let topics_dir = dir.parent().unwrap_or(self.data.root());
        storage
            .sync_dir(topics_dir)
            .ctx(|| format!("syncing {}", topics_dir.display()))?;
        let topic = Arc::new(Topic::open(
            Arc::clone(storage),
            &dir,
            name,
            config,
            self.options.recovery,
        )?);
        topics.insert(name.to_owned(), Arc::clone(&topic));
        Ok(topic)
    }

    /// The topic `name`, created with the default config if missing and
    /// `auto_create` is on (or `force` is set, as for dead-letter topics).
    pub fn topic_or_create(&self, name: &str, force: bool) -> Result<Arc<Topic>> {
        match self.topic(name) {
            Err(Error::NotFound(_)) if self.options.auto_create || force => {
                match self.create_topic(name, self.options.defaults.clone()) {
                    Err(Error::AlreadyExists(_)) => self.topic(name),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Deletes a topic with all its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let topic = self
            .write_topics()
            .remove(name)
            .ok_or_else(|| Error::NotFound(format!("topic {name} does not exist")))?;
        let dir = topic.dir().to_owned();
        drop(topic);
        let storage = self.data.storage();
        storage
            .remove_dir_all(&dir)
            .ctx(|| format!("removing {}", dir.display()))?;
        let topics_dir = dir.parent().unwrap_or(self.data.root());
        storage
            .sync_dir(topics_dir)
            .ctx(|| format!("syncing {}", topics_dir.display()))
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
            let stats = t.compact(now, progress)?;
            out.push((t.name().to_owned(), stats));
        }
        Ok(out)
    }

    /// A queue fetch with its dead letters handed to the dead-letter topic
    /// (durably) before they are completed in the group.
    pub fn fetch_queue(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        max: usize,
        max_bytes: usize,
        now: u64,
    ) -> Result<QueueFetch> {
        let source = self.topic(topic)?;
        let fetch = source.fetch_queue(group, member, max, max_bytes, now)?;
        if !fetch.dead_letters.is_empty() {
            let dlq = self.topic_or_create(&source.config().dead_letter_topic(topic), true)?;
            let messages: Vec<_> = fetch
                .dead_letters
                .iter()
                .map(|d| d.message.clone())
                .collect();
            dlq.produce(&messages)?;
            if dlq.config().log.fsync != crate::storage::FsyncPolicy::Always {
                dlq.log().sync()?;
            }
            let offsets: Vec<u64> = fetch.dead_letters.iter().map(|d| d.offset).collect();
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
