import os, struct
def varint(n):
    out=b''
    while True:
        b=n&0x7f; n>>=7
        if n: out+=bytes([b|0x80])
        else: return out+bytes([b])
def f_str(num,s): s=s.encode() if isinstance(s,str) else s; return varint(num<<3|2)+varint(len(s))+s
def f_int(num,v): return varint(num<<3|0)+varint(v)
def f_dbl(num,v): return varint(num<<3|1)+struct.pack('<d',v)
def w(d,name,b):
    os.makedirs(d,exist_ok=True); open(os.path.join(d,name),'wb').write(b)
# policy: form byte 0 = SetPolicyRequest
w('seeds/policy','request_preset', b'\x00'+f_str(1,'db')+f_str(2,'gobreaker')+f_int(8,10000))
w('seeds/policy','request_fields', b'\x00'+f_str(1,'db')+f_int(3,10)+f_dbl(4,0.5)+f_int(5,3)+f_int(7,60000)+f_int(8,30000)+f_int(9,2)+f_str(10,'EPERM')+f_int(11,250)+f_int(12,1)+f_str(13,'50%')+f_int(14,60000)+f_str(15,'destination')+f_int(16,30)+f_int(17,300000)+f_int(18,600000)+f_str(19,'audit'))
# rpc: (call, len, body)*
def call(n,body): assert len(body)<256; return bytes([n,len(body)])+body
put=call(3, f_str(1,'db')+f_str(2,'127.0.0.1:1001')+f_str(2,'10.0.0.0/24:80'))
pol=call(11, f_str(1,'db')+f_str(2,'gobreaker'))
polx=call(11, f_str(1,'db')+f_int(5,2)+f_str(15,'destination')+f_int(16,100))
conn_fail=call(18, bytes([1,0xe9,0x03,1]))  # 127.0.0.1:1001 refused
conn_ok=call(18, bytes([1,0xe9,0x03,0]))
adv=call(19, bytes([0x10,0x27]))
w('seeds/rpc','lifecycle', put+pol+conn_ok+conn_fail+conn_fail+conn_fail+call(9,b'')+call(10,f_str(1,'db'))+adv+conn_ok+call(1,f_str(1,'db')+f_int(2,1)+f_int(3,5))+call(7,f_str(1,'db'))+call(12,f_str(1,'db'))+call(4,f_str(1,'db')))
w('seeds/rpc','trip_reset', put+pol+call(13,f_str(1,'db')+f_int(2,30000)+f_str(3,'maintenance'))+call(10,f_str(1,'db'))+call(14,f_str(1,'db'))+call(15,f_str(1,'db'))+call(17,f_str(1,'db')))
w('seeds/rpc','destinations', put+polx+conn_fail+conn_fail+call(13,f_str(1,'db')+f_str(4,'127.0.0.1:1001'))+call(14,f_str(1,'db')+f_str(2,'127.0.0.1:1001'))+call(7,f_str(2,'127.0.0.1:1001')+f_str(4,'connect'))+call(2,f_str(1,'db')+f_int(2,10)))
w('seeds/rpc','reads', call(0,b'')+call(5,b'')+call(6,f_int(1,5))+call(8,b'')+call(16,b'')+call(1,b''))
w('seeds/rpc','listing', put+conn_ok+adv+conn_ok+conn_fail+call(20,b'')+call(20,f_str(1,'db')+f_int(2,1))+call(20,f_str(1,'nope'))+call(2,f_str(1,'db')))
# pinned
MAGIC=struct.unpack('<I',b'BWLY')[0]
def lpm(prefix, port, addr16, sid): return struct.pack('<I',prefix)+struct.pack('>H',port)+addr16+struct.pack('<I',sid)
v4=lambda a: bytes(10)+b'\xff\xff'+bytes(a)
def meta(sid,name,reason=b'',owners=(0,0,0)):
    m=struct.pack('<HBBHBB',len(name),owners[0],owners[1],len(reason),owners[2],0)+name.ljust(64,b'\0')+reason.ljust(128,b'\0')
    assert len(m)==200; return struct.pack('<I',sid)+m
keys=[lpm(16+128,5432,v4([10,0,0,7]),1), lpm(16+96+24,5432,v4([10,0,1,0]),1), lpm(16+64,80,bytes([0xfd])+bytes(15),2)]
metas=[meta(1,b'db',b'',(1,1,0)), meta(2,b'web',b'maintenance',(2,2,2))]
policy=struct.pack('<IIIIQQQIIII',3,600000,5,0,60_000_000_000,30_000_000_000,0,1,111,1,0)
assert len(policy)==56
counts=struct.pack('<IIQQQQQQQQQQ',1,1,7,10,6,4,3,0,0,0,90_000_000_000,60_000_000_000)
entry=struct.pack('<II',0,0)+counts
assert len(entry)==96
totals=struct.pack('<QQQQ',3,1,0,3)[:32]
dest=struct.pack('<QQII',300_000_000_000,600_000_000_000,50,2)
more=bytes(24)
now=struct.pack('<Q',70_000_000_000)
body=bytes([3])+struct.pack('<II',MAGIC,3)+bytes([len(keys)])+b''.join(keys)+bytes([len(metas)])+b''.join(metas)+bytes([1,2,0])+policy+entry+totals+dest+more+now
w('seeds/pinned','current', body)
w('seeds/pinned','older', bytes([3])+struct.pack('<II',MAGIC,1)+bytes([len(keys)])+b''.join(keys)+bytes([len(metas)])+b''.join(metas)+bytes([0,0,0]))
w('seeds/pinned','fresh', bytes([0]))
