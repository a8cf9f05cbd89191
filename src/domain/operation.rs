use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

/// The IVS Chat operations this crate calls (the service) or answers (the
/// emulator), by their AWS names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateRoom,
    GetRoom,
    UpdateRoom,
    DeleteRoom,
    ListRooms,
    TagResource,
    UntagResource,
    ListTagsForResource,
}

impl Operation {
    pub const ALL: [Operation; 8] = [
        Operation::CreateRoom,
        Operation::GetRoom,
        Operation::UpdateRoom,
        Operation::DeleteRoom,
        Operation::ListRooms,
        Operation::TagResource,
        Operation::UntagResource,
        Operation::ListTagsForResource,
    ];

    /// Its position in [`Operation::ALL`], for per-operation arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The rate AWS allows, in calls per second per account and region (the
    /// IVS Chat service quotas page; AWS does not raise them): 5 for the room
    /// calls, 10 for the tag calls.
    pub fn aws_rate(self) -> NonZeroU32 {
        let rate = match self {
            Operation::CreateRoom
            | Operation::GetRoom
            | Operation::UpdateRoom
            | Operation::DeleteRoom
            | Operation::ListRooms => 5,
            Operation::TagResource | Operation::UntagResource | Operation::ListTagsForResource => {
                10
            }
        };
        NonZeroU32::new(rate).expect("a published rate is not zero")
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromStr for Operation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .into_iter()
            .find(|op| op.to_string() == s)
            .ok_or_else(|| {
                format!(
                    "unknown operation {s}; one of {}",
                    Operation::ALL.map(|op| op.to_string()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_parse_by_their_aws_names() {
        assert_eq!("GetRoom".parse(), Ok(Operation::GetRoom));
        assert!("getroom".parse::<Operation>().is_err());
        for op in Operation::ALL {
            assert_eq!(Operation::ALL[op.index()], op);
            assert_eq!(op.to_string().parse(), Ok(op));
        }
    }

    #[test]
    fn published_rates() {
        let rates: Vec<(String, u32)> = Operation::ALL
            .iter()
            .map(|op| (op.to_string(), op.aws_rate().get()))
            .collect();
        let expected = [
            ("CreateRoom", 5),
            ("GetRoom", 5),
            ("UpdateRoom", 5),
            ("DeleteRoom", 5),
            ("ListRooms", 5),
            ("TagResource", 10),
            ("UntagResource", 10),
            ("ListTagsForResource", 10),
        ]
        .map(|(op, rate)| (op.to_owned(), rate));
        assert_eq!(rates, expected);
    }
}
