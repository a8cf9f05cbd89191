//! The emulator's rooms and what each operation does to them, free of HTTP.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::Rng as _;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

use crate::domain::{
    Error, ListQuery, ListedPage, NewRoom, PageCursor, Result, Room, RoomArn, RoomPatch, Timestamp,
    validate,
};

/// The rooms of one account in every region, each region apart: an
/// operation sees only the rooms of the region it was sent to (the region of
/// the request's signature), as AWS's regional endpoints separate them.
pub(crate) struct State {
    account_id: String,
    rooms: HashMap<String, Room>,
    file: Option<PathBuf>,
    /// Every version rooms have taken, once asked to keep them.
    versions: Option<Vec<Room>>,
}

/// What the state file holds.
#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    rooms: Vec<Room>,
}

impl State {
    /// Loads `file` (every region's rooms) if it exists; a missing file is an
    /// empty account.
    pub(crate) fn open(account_id: &str, file: Option<&Path>) -> anyhow::Result<State> {
        let rooms = match file {
            Some(path) if path.exists() => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("could not read emulator state {}", path.display()))?;
                let persisted: Persisted = serde_json::from_slice(&bytes).with_context(|| {
                    format!("could not parse emulator state {}", path.display())
                })?;
                persisted.rooms
            }
            _ => Vec::new(),
        };
        Ok(State {
            account_id: account_id.to_owned(),
            rooms: rooms.into_iter().map(|r| (r.id.clone(), r)).collect(),
            file: file.map(Path::to_path_buf),
            versions: None,
        })
    }

    pub(crate) fn create(&mut self, region: &str, new: NewRoom) -> Result<Room> {
        validate::new_room(&new)?;
        let id: String = loop {
            let id: String = rand::rng()
                .sample_iter(&Alphanumeric)
                .take(12)
                .map(char::from)
                .collect();
            if !self.rooms.contains_key(&id) {
                break id;
            }
        };
        let now = Timestamp::now().truncate_to_micros();
        let room = Room {
            arn: RoomArn::new(region, &self.account_id, &id).to_string(),
            id: id.clone(),
            name: new.name,
            create_time: now,
            update_time: now,
            maximum_message_rate_per_second: new
                .maximum_message_rate_per_second
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND),
            maximum_message_length: new
                .maximum_message_length
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH),
            message_review_handler: new.message_review_handler.filter(|h| !h.uri.is_empty()),
            tags: new.tags,
            logging_configuration_identifiers: new.logging_configuration_identifiers,
            details_pending: false,
        };
        self.rooms.insert(id.clone(), room.clone());
        self.save()?;
        self.record(&id);
        Ok(room)
    }

    pub(crate) fn get(&self, region: &str, identifier: &str) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        self.find(region, &arn).cloned()
    }

    pub(crate) fn update(
        &mut self,
        region: &str,
        identifier: &str,
        patch: &RoomPatch,
    ) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::room_patch(patch)?;
        let room = self.find_mut(region, &arn)?;
        patch.apply_to(room);
        // Strictly greater than before, even for back-to-back updates.
        let next = room
            .update_time
            .saturating_add(std::time::Duration::from_micros(1));
        room.update_time = Timestamp::now().truncate_to_micros().max(next);
        let room = room.clone();
        self.save()?;
        self.record(&room.id);
        Ok(room)
    }

    pub(crate) fn delete(&mut self, region: &str, identifier: &str) -> Result<()> {
        let arn = RoomArn::parse("identifier", identifier)?;
        self.find(region, &arn)?;
        self.rooms.remove(arn.id());
        self.save()
    }

    pub(crate) fn list(&self, region: &str, query: &ListQuery) -> Result<ListedPage<Room>> {
        validate::list_query(query)?;
        let after = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => Some(PageCursor::decode(token)?),
            None => None,
        };
        let mut rooms: Vec<&Room> = self
            .rooms
            .values()
            .filter(|r| in_region(r, region) && query.matches(r))
            .collect();
        rooms.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
        let start = match &after {
            Some(after) => rooms.partition_point(|r| {
                order_key(r) <= (std::cmp::Reverse(after.update_time), after.key.as_str())
            }),
            None => 0,
        };
        let limit = query.limit();
        let page: Vec<Room> = rooms[start..]
            .iter()
            .take(limit)
            .map(|r| (*r).clone())
            .collect();
        let next_token = (start + limit < rooms.len())
            .then(|| {
                page.last().map(|last| {
                    PageCursor {
                        update_time: last.update_time,
                        key: last.id.clone(),
                    }
                    .encode()
                })
            })
            .flatten();
        Ok(ListedPage {
            rooms: page,
            next_token,
        })
    }

    pub(crate) fn tag(
        &mut self,
        region: &str,
        resource_arn: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<()> {
        let arn = self.resource(resource_arn)?;
        validate::tags("tags", &tags)?;
        let room = self.find_mut(region, &arn)?;
        let mut merged = room.tags.clone();
        merged.extend(tags);
        if merged.len() > validate::MAX_TAGS {
            return Err(Error::invalid(
                "tags",
                format!("a resource can have at most {} tags", validate::MAX_TAGS),
            ));
        }
        // Tagging does not move updateTime, as in IVS Chat.
        room.tags = merged;
        self.save()?;
        self.record(arn.id());
        Ok(())
    }

    pub(crate) fn untag(
        &mut self,
        region: &str,
        resource_arn: &str,
        keys: &[String],
    ) -> Result<()> {
        let arn = self.resource(resource_arn)?;
        validate::tag_keys("tagKeys", keys)?;
        let room = self.find_mut(region, &arn)?;
        for key in keys {
            room.tags.remove(key);
        }
        self.save()?;
        self.record(arn.id());
        Ok(())
    }

    pub(crate) fn tags(
        &self,
        region: &str,
        resource_arn: &str,
    ) -> Result<BTreeMap<String, String>> {
        let arn = self.resource(resource_arn)?;
        Ok(self.find(region, &arn)?.tags.clone())
    }

    /// Every room, in no order.
    pub(crate) fn rooms(&self) -> Vec<Room> {
        self.rooms.values().cloned().collect()
    }

    /// From now on, keeps every version a room takes, starting with the
    /// rooms as they are.
    pub(crate) fn keep_versions(&mut self) {
        if self.versions.is_none() {
            self.versions = Some(self.rooms());
        }
    }

    /// The versions kept since [`State::keep_versions`], oldest first.
    pub(crate) fn versions(&self) -> Vec<Room> {
        self.versions.clone().unwrap_or_default()
    }

    /// Keeps room `id` as it is now, if versions are kept.
    fn record(&mut self, id: &str) {
        if let (Some(versions), Some(room)) = (&mut self.versions, self.rooms.get(id)) {
            versions.push(room.clone());
        }
    }

    fn resource(&self, resource_arn: &str) -> Result<RoomArn> {
        validate::resource_arn("resourceArn", resource_arn)?;
        // Only rooms carry tags here; any other resource type is unknown. The
        // model's ResourceId is `[a-zA-Z0-9]+`: the part after the slash.
        RoomArn::parse("resourceArn", resource_arn).map_err(|_| {
            let id = resource_arn
                .rsplit_once('/')
                .map_or(resource_arn, |(_, id)| id);
            Error::NotFound {
                resource_id: id.to_owned(),
                message: format!("resource {resource_arn} not found"),
            }
        })
    }

    /// Room `arn`, if it is one of `region`'s: another region's endpoint
    /// does not know it.
    fn find(&self, region: &str, arn: &RoomArn) -> Result<&Room> {
        self.rooms
            .get(arn.id())
            .filter(|r| r.arn == arn.as_str() && arn.region() == region)
            .ok_or_else(|| Error::room_not_found(arn.id()))
    }

    fn find_mut(&mut self, region: &str, arn: &RoomArn) -> Result<&mut Room> {
        self.rooms
            .get_mut(arn.id())
            .filter(|r| r.arn == arn.as_str() && arn.region() == region)
            .ok_or_else(|| Error::room_not_found(arn.id()))
    }

    /// Writes the whole state atomically (temporary file, then rename), so a
    /// crash leaves either the old or the new state.
    fn save(&self) -> Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let persisted = Persisted {
            rooms: self.rooms.values().cloned().collect(),
        };
        let write = || -> anyhow::Result<()> {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let mut tmp = tempfile_in(dir.unwrap_or(Path::new(".")))?;
            serde_json::to_writer(&mut tmp.1, &persisted)?;
            tmp.1.flush()?;
            tmp.1.sync_all()?;
            std::fs::rename(&tmp.0, path)?;
            Ok(())
        };
        write()
            .with_context(|| format!("could not write emulator state {}", path.display()))
            .map_err(Error::Internal)
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    std::fs::create_dir_all(dir)?;
    // Unique per write: emulators in one process may keep state files in one
    // directory, and a shared name would let one's rename take the other's file.
    let path = dir.join(format!(
        ".emulator-state-{}-{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = std::fs::File::create_new(&path)?;
    Ok((path, file))
}

/// Whether `room` lives in `region`.
fn in_region(room: &Room, region: &str) -> bool {
    RoomArn::parse("arn", &room.arn).is_ok_and(|arn| arn.region() == region)
}

/// Newest first; ties broken by id so pages never overlap.
fn order_key(room: &Room) -> (std::cmp::Reverse<Timestamp>, &str) {
    (std::cmp::Reverse(room.update_time), room.id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_versions_are_every_state_a_room_took() {
        let mut state = State::open("123456789012", None).unwrap();
        let before = state
            .create(
                "us-east-1",
                NewRoom {
                    name: "before".into(),
                    ..NewRoom::default()
                },
            )
            .unwrap();
        assert!(state.versions().is_empty(), "not kept until asked");
        state.keep_versions();
        let renamed = state
            .update(
                "us-east-1",
                &before.arn,
                &RoomPatch {
                    name: Some("renamed".into()),
                    ..RoomPatch::default()
                },
            )
            .unwrap();
        state
            .tag("us-east-1", &before.arn, [("k".into(), "v".into())].into())
            .unwrap();
        let tagged = state.get("us-east-1", &before.arn).unwrap();
        state
            .untag("us-east-1", &before.arn, &["k".into()])
            .unwrap();
        state.delete("us-east-1", &before.arn).unwrap();
        assert_eq!(state.versions(), [before, renamed.clone(), tagged, renamed]);
    }
}
