-- Indexes for the key search (`KeyFilter::search`: a substring of the name or the owner id, ASCII
-- letters folded, or the hint exactly), so that a rare needle is found without reading every key.
--
-- The hint: an equality, by its own index.
CREATE INDEX api_keys_key_hint ON api_keys (key_hint);

-- Names and owner ids: an FTS5 trigram index over the api_keys rows (external content: the text is
-- read from api_keys, only the index is stored here), keyed by api_keys' rowid, which VACUUM keeps
-- for a table with indexes. A phrase of three or more characters matches exactly the rows holding it
-- as a substring, letters folded by Unicode case rules: more folding than the search's ASCII-only
-- folding, so the matches are candidates, and the search applies its own predicate to them.
-- Triggers keep the index in step with every insert, rename and delete; the update trigger fires only
-- when the name or the owner id really changes.
CREATE VIRTUAL TABLE api_keys_search USING fts5 (
    name, owner_id,
    content = 'api_keys', content_rowid = 'rowid', tokenize = 'trigram', detail = 'full'
);

CREATE TRIGGER api_keys_search_insert AFTER INSERT ON api_keys BEGIN
    INSERT INTO api_keys_search (rowid, name, owner_id) VALUES (new.rowid, new.name, new.owner_id);
END;

CREATE TRIGGER api_keys_search_delete AFTER DELETE ON api_keys BEGIN
    INSERT INTO api_keys_search (api_keys_search, rowid, name, owner_id)
    VALUES ('delete', old.rowid, old.name, old.owner_id);
END;

CREATE TRIGGER api_keys_search_update AFTER UPDATE OF name, owner_id ON api_keys
WHEN old.name IS NOT new.name OR old.owner_id IS NOT new.owner_id BEGIN
    INSERT INTO api_keys_search (api_keys_search, rowid, name, owner_id)
    VALUES ('delete', old.rowid, old.name, old.owner_id);
    INSERT INTO api_keys_search (rowid, name, owner_id) VALUES (new.rowid, new.name, new.owner_id);
END;

-- The keys already there.
INSERT INTO api_keys_search (api_keys_search) VALUES ('rebuild');
